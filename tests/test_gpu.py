"""CUDA paths (bf16, fused optimizers, the ESD on the GPU). Marked `gpu`: skipped where CUDA is absent, as in CI."""

import pytest
import torch

from alphadecay import esd
from tests.conftest import by_step, read_metrics, run_main, train_args

pytestmark = pytest.mark.gpu


def test_pure_bf16_training_on_cuda(tmp_path):
    assert run_main(train_args(tmp_path, device="cuda", dtype="bfloat16", wd_scheduler="alphadecay",
                               unbalancedWD_every=2, num_training_steps=4)) == 0
    losses = by_step(read_metrics(tmp_path), "loss")
    assert len(losses) == 4 and all(v == v for v in losses.values())


@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_esd_on_cuda_matches_cpu(gram_dtype):
    """N >= 512: the blocked Gram product (upper block rows by matmul, lower blocks copied) on the GPU, in the
    dtype the median fit (fp32) and the search fits (fp64) use; every entry written; a NaN weight is a NaN row."""
    from alphadecay.esd.spectral import _gram

    gen = torch.Generator().manual_seed(0)
    weights = [(f"w{i}", torch.randn(*shape, generator=gen) * 0.02)
               for i, shape in enumerate([(1376, 512), (512, 1376), (640, 640), (700, 515)])]
    fit = "median" if gram_dtype == torch.float32 else "goodness-of-fit"
    cpu = esd.module_metrics(weights, fit=fit)
    gpu = esd.module_metrics([(n, w.cuda()) for n, w in weights], fit=fit)
    for name in cpu:
        assert gpu[name]["alpha"] == pytest.approx(cpu[name]["alpha"], rel=1e-4), name
    for _, w in weights:
        a = w.cuda().to(gram_dtype)
        out = torch.full((min(w.shape),) * 2, float("nan"), dtype=gram_dtype, device="cuda")
        _gram(a if a.shape[0] >= a.shape[1] else a.mT, out)
        exact = (a.mT @ a if a.shape[0] >= a.shape[1] else a @ a.mT).double()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5 * exact.abs().max().item())
        cuda_eigs = esd.eigenvalues([w.cuda()], gram_dtype=gram_dtype)[0].cpu()
        torch.testing.assert_close(cuda_eigs, torch.linalg.svdvals(w.double()).square().sort().values, rtol=0,
                                   atol=1e-5 * cuda_eigs[-1].item())
    poisoned = weights[0][1].clone().cuda()
    poisoned[1, 2] = float("nan")
    out = esd.module_metrics([("poisoned", poisoned), (weights[1][0], weights[1][1].cuda())], fit=fit)
    assert out["poisoned"]["alpha"] != out["poisoned"]["alpha"]
    assert out[weights[1][0]]["alpha"] == pytest.approx(cpu[weights[1][0]]["alpha"], rel=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_chunked_head_gradient_on_cuda_is_rounded_once(compiled):
    """The chunked loss accumulates the head-weight gradient through a bf16 matmul with a float32 output (eager,
    and as inductor lowers it): within one bf16 unit in the last place of the exact gradient, as the unchunked."""
    import torch.nn.functional as F

    from alphadecay.data import IGNORE_INDEX
    from alphadecay.loss import chunked_cross_entropy_sum
    from tests.test_loss import bf16_ulps, zero_head_problem

    h, w, t, exact = zero_head_problem(n=1024, hidden=64, device="cuda")
    whole, = torch.autograd.grad(F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGNORE_INDEX,
                                                 reduction="sum"), (w,))
    loss_fn = chunked_cross_entropy_sum
    if compiled:
        torch._dynamo.reset()
        loss_fn = torch.compile(chunked_cross_entropy_sum, fullgraph=True)
    got, = torch.autograd.grad(loss_fn(h, w, t, chunk_tokens=48), (w,))
    assert got.dtype == torch.bfloat16
    assert bf16_ulps(whole.cpu(), exact) <= 1 and bf16_ulps(got.cpu(), exact) <= 1


def test_cuda_adam_kernels_apply_the_decay_the_cpu_ones_do():
    """On CUDA, foreach keeps its scalars in float32 (the CPU one rounds wd to bf16), so the same bounds hold."""
    from tests.test_optimizer_impl import decay_ratios

    ratio = decay_ratios(0, device="cuda")
    assert ratio["foreach"] < 0.4 and 0.8 < ratio["fused"] < 1.6


def test_dtype_auto_and_the_official_adam_kernel_on_this_gpu():
    from alphadecay.config import parse_args
    from alphadecay.optim import build_optimizer
    from alphadecay.model import resolve_dtype

    device = torch.device("cuda", 0)
    expected = "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float32"
    assert resolve_dtype("auto", device)[2] == expected
    p = torch.nn.Parameter(torch.zeros(4, device=device))
    for optimizer, kernel in (("adam", "foreach"), ("adamw", "fused")):
        config, _ = parse_args(["--optimizer", optimizer])
        built = build_optimizer([{"params": [p], "weight_decay": 0.1, "lr_scale": 1.0}], config, device)
        assert built.defaults[kernel]


def test_a_model_built_on_the_gpu_equals_the_cpu_build_bit_for_bit():
    """build_model(device=cuda) and the ViT under built_on(cuda): every parameter, the RoPE buffers and the CPU and
    CUDA generators' states afterwards are those of the host build (alphadecay/device_init.py)."""
    from alphadecay.device_init import built_on
    from alphadecay.model import build_model, cast_model, load_model_config
    from alphadecay.vit.model import build_vit
    from tests.conftest import TINY_CONFIG

    def llama(device):
        return cast_model(build_model(load_model_config(TINY_CONFIG), seed=0, device=device), "cuda", torch.float32)

    def vit(device):
        torch.manual_seed(0)
        with built_on(device):
            return build_vit("vit_tiny_patch4_32", num_classes=10).cuda()

    def tensors(model):
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    for build in (llama, vit):
        host = tensors(build("cpu"))
        rng = torch.get_rng_state(), torch.cuda.get_rng_state()
        got = tensors(build(torch.device("cuda", 0)))
        assert torch.equal(torch.get_rng_state(), rng[0]) and torch.equal(torch.cuda.get_rng_state(), rng[1])
        assert got.keys() == host.keys()
        for name, value in host.items():
            assert got[name].device.type == "cuda" and torch.equal(got[name], value), name


def test_the_prefetcher_pins_batches_for_the_gpu():
    from alphadecay.data import Prefetcher

    source = iter([({"input_ids": torch.ones(2, 8, dtype=torch.int32)}, {"rows": 2})])
    (batch, state), = list(Prefetcher(source, device=torch.device("cuda", 0)))
    assert batch["input_ids"].is_pinned() and state == {"rows": 2}
    assert torch.equal(batch["input_ids"].to("cuda", non_blocking=True).cpu(), torch.ones(2, 8, dtype=torch.int32))
