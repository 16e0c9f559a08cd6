"""The speed paths on CUDA: chunked loss (value, gradients, lower peak memory), torch.compile (inductor/triton),
and the per-device throughput and MFU in a real run. Marked `gpu`: skipped where CUDA is absent, as in CI;
benchmarks/gpu_check.sh runs them first."""

import pytest
import torch

from alphadecay import dist
from alphadecay.config import parse_args
from alphadecay.data import IGNORE_INDEX
from alphadecay.loss import CausalLMLoss, chunked_cross_entropy_sum
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.wd.groups import module_param_groups
from alphadecay.run import wrap_model
from alphadecay.trainer import Trainer
from tests.conftest import TINY_CONFIG, by_step, read_metrics, run_main, train_args

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def test_chunked_loss_on_cuda_bf16_matches_the_full_loss():
    raw = build_model(load_model_config(TINY_CONFIG), seed=0).to(CUDA, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8000, (4, 128), generator=gen).to(CUDA)
    labels = ids.clone()
    labels[:, 100:] = IGNORE_INDEX
    results = []
    for chunk in (0, 96):
        raw.zero_grad(set_to_none=True)
        loss = CausalLMLoss(raw, chunk)(ids, labels)
        loss.backward()
        results.append((loss.detach().float(), torch.cat([p.grad.float().flatten() for p in raw.parameters()])))
    (full, g_full), (chunked, g_chunked) = results
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    assert (g_chunked - g_full).norm() / g_full.norm() < 2e-2  # bf16 rounding of different summation orders


def test_chunked_loss_holds_less_cuda_memory_at_the_60m_vocabulary():
    tokens, hidden_size, vocab = 8 * 256, 512, 32000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(CUDA, torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(CUDA, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(CUDA)

    def peak(fn) -> int:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    full = peak(lambda: torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum"))
    chunked = peak(lambda: chunked_cross_entropy_sum(hidden, weight, targets, chunk_tokens=512))
    logits_fp32 = tokens * vocab * 4
    assert full > 2 * logits_fp32  # the bf16 logits, their fp32 copy and the saved log-softmax at least
    assert chunked < 0.5 * full


def test_compiled_updates_match_eager_on_cuda():
    """Pure bf16, the shapes of tests/conftest.py's train_args, so inductor's cache serves the CLI runs below."""
    def losses(compiled: bool) -> list[float]:
        config, _ = parse_args(["--model_config", TINY_CONFIG, "--optimizer", "adamw", "--lr", "3e-3"])
        raw = build_model(load_model_config(TINY_CONFIG), seed=0).to(CUDA, torch.bfloat16)
        optimizer = build_optimizer(module_param_groups(raw, 0.1), config, CUDA)
        info = dist.DistInfo(0, 0, 1, CUDA)
        trainer = Trainer.for_updates(config, info, wrap_model(raw, config, info, compile=compiled), optimizer,
                                      raw_model=raw)
        ids = torch.randint(3, 8000, (4, 64), generator=torch.Generator().manual_seed(0)).to(CUDA)
        out = []
        for step in range(5):
            outcome = trainer.train_step([{"input_ids": ids, "labels": ids}])
            out.append(outcome.loss_sum / outcome.counts[0])
        return out

    eager, compiled = losses(False), losses(True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, abs=3e-2, rel=0)  # bf16: fused kernels round differently


def test_a_cuda_run_compiles_by_default_and_logs_mfu(tmp_path, capsys):
    assert run_main(train_args(tmp_path, device="cuda", dtype="bfloat16", num_training_steps=4, eval_every=4,
                               save_every=4, peak_tflops=100)) == 0
    assert "bfloat16, compiled on cuda" in capsys.readouterr().out
    metrics = read_metrics(tmp_path)
    mfu = by_step(metrics, "mfu")
    per_device = by_step(metrics, "tokens_per_s_per_device")
    assert sorted(mfu) == sorted(per_device) == [1, 2, 3, 4]
    assert all(0 < v < 1 for v in mfu.values()) and all(v > 0 for v in per_device.values())
