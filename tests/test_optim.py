"""Learning-rate schedule (the official formula) and the two decay couplings."""

import math

import pytest
import torch

from alphadecay.optim import lr_factor


def official_cosine(step, warmup, total, min_ratio):
    """GaLore/AlphaDecay training_utils._get_cosine_schedule_with_min_lr_lambda, written out independently."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("step", [0, 1, 999, 1000, 1001, 5000, 9999])
def test_cosine_matches_the_official_formula(step):
    got = lr_factor(step, total_steps=10000, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.1)
    assert got == pytest.approx(official_cosine(step, 1000, 10000, 0.1))


def test_schedule_shape():
    kw = dict(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, schedule="cosine", **kw) == 0.0  # the official first update uses lr 0
    assert lr_factor(10, schedule="cosine", **kw) == 1.0
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(55, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(99, schedule="constant", **kw) == 1.0


def test_adam_couples_and_adamw_decouples_weight_decay():
    """With a zero gradient, Adam's L2 term becomes a normalised step; AdamW shrinks by exactly lr*wd."""
    lr, wd = 0.1, 0.5
    for cls, expected in ((torch.optim.AdamW, 1.0 * (1 - lr * wd)), (torch.optim.Adam, 1.0 - lr)):
        p = torch.nn.Parameter(torch.ones(1))
        opt = cls([p], lr=lr, weight_decay=wd)
        p.grad = torch.zeros(1)
        opt.step()
        # Adam: g = 0 + wd*p = 0.5, m/sqrt(v) = sign = 1 after bias correction, so p -= lr
        assert p.item() == pytest.approx(expected, rel=1e-6)
