"""What a run resolves and records besides its flags: --dtype auto, and the provenance of config.json/metrics."""

import pytest
import torch

from alphadecay.run import resolve_dtype


@pytest.mark.parametrize("capability,expected", [((7, 0), "float32"), ((7, 5), "float32"), ((8, 0), "bfloat16"),
                                                 ((9, 0), "bfloat16")])
def test_dtype_auto_is_bf16_only_from_compute_capability_8(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16, and torch.cuda.is_bf16_supported() says yes there too."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, autocast, name = resolve_dtype("auto", torch.device("cuda", 0))
    assert name == expected and dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[expected]
    assert not autocast


def test_dtype_names_resolve_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.float32, False, "float32")
    assert resolve_dtype("amp_bf16", torch.device("cpu")) == (torch.float32, True, "amp_bf16")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == (torch.bfloat16, False, "bfloat16")
