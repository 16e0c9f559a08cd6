"""Building a model on its device (alphadecay/device_init.py) gives the CPU build's values and random stream.

CPU-only torch has no second device with values, so the mechanism is checked in two halves here: HostCompute on
the CPU's own tensors (every operation on a copy with the same strides, then written back) must leave every value
and the generator's state unchanged; a build on `meta` must hold its parameters there (none on the host) and leave
the generator where a host build does. tests/test_gpu.py compares a CUDA build with the CPU build value by value."""

import torch

from alphadecay.device_init import HostCompute, built_on
from alphadecay.model import build_model, load_model_config
from alphadecay.vit.model import build_vit
from tests.conftest import TINY_CONFIG


def llama(**kwargs):
    return build_model(load_model_config(TINY_CONFIG), seed=0, **kwargs)


def vit():
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch4_32", num_classes=10)


def built_and_rng(build):
    model = build()
    return model.state_dict(), torch.get_rng_state()


def test_operations_on_host_copies_reproduce_the_cpu_build_bit_for_bit():
    for build in (llama, vit):  # normal_/kaiming-uniform (LLaMA); truncated normal with rejection, conv init (ViT)
        reference, reference_rng = built_and_rng(build)
        with HostCompute("cpu") as mode:
            shadowed, rng = built_and_rng(build)
        assert mode.ops >= len(reference)  # at least one operation per tensor ran on a copy
        assert torch.equal(rng, reference_rng)
        assert all(torch.equal(shadowed[k], reference[k]) for k in reference)


def test_host_copies_keep_strides_views_and_results():
    """A transposed tensor draws its random numbers in another order than a contiguous one; a view (a padding row)
    must stay a view of its base; an out-of-place result comes back as a new tensor."""
    def ops():
        torch.manual_seed(1)
        weight = torch.empty(32, 8).t()
        weight.normal_(0.0, 0.02)
        weight[3].zero_()
        return weight, torch.nn.init.trunc_normal_(torch.empty(4, 40), std=0.5) * 2

    expected = ops()
    with HostCompute("cpu") as mode:
        got = ops()
    assert mode.ops >= 4
    assert got[0].stride() == (1, 8) and not got[0][3].any()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_build_on_meta_holds_no_parameter_on_the_host_and_consumes_the_same_random_stream():
    host = llama()
    host_rng = torch.get_rng_state()
    meta = llama(device="meta")
    assert torch.equal(torch.get_rng_state(), host_rng)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in host.named_parameters()]
    assert all(torch.equal(b, dict(host.named_buffers())[n]) for n, b in meta.named_buffers())  # RoPE, on the host
    with built_on("cpu"):  # the CPU is a no-op
        plain = llama()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), host.parameters()))
