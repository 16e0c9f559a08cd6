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


def test_esd_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    weights = [(f"w{i}", torch.randn(256, 96, generator=gen) * 0.02) for i in range(4)]
    cpu = esd.module_metrics(weights)
    gpu = esd.module_metrics([(n, w.cuda()) for n, w in weights])
    for name in cpu:
        assert gpu[name]["alpha"] == pytest.approx(cpu[name]["alpha"], rel=1e-4)
