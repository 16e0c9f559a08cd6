"""alphadecay.vit.mixup: Mixup/CutMix against hand computations from the same draws, the smoothed targets, and
the losses against PyTorch's own cross-entropy. CPU, under a second."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alphadecay.errors import UserError
from alphadecay.vit.mixup import (LabelSmoothingCrossEntropy, Mixup, SoftTargetCrossEntropy, build_criterion,
                                  cutmix_box, mixup_target, smooth_one_hot, soft_target_cross_entropy)

C = 10


def batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, C, (b,), generator=g)


def test_smoothed_one_hot():
    y = smooth_one_hot(torch.tensor([2, 0]), C, 0.1)
    assert torch.allclose(y[0, 2], torch.tensor(0.91)) and torch.allclose(y[0, 0], torch.tensor(0.01))
    assert torch.allclose(y.sum(dim=1), torch.ones(2))


def test_mixup_batch_equals_a_hand_computation_from_the_same_draws():
    x, y = batch()
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1, num_classes=C)
    mixed, target = mix(x.clone(), y, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    assert rng.random() < 1.0  # the "mix at all" draw
    lam = rng.beta(0.8, 0.8)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    expected = lam * smooth_one_hot(y, C, 0.1) + (1 - lam) * smooth_one_hot(y.flip(0), C, 0.1)
    assert torch.allclose(target, expected)


def test_cutmix_batch_pastes_the_mirrored_sample_and_corrects_lambda():
    x, y = batch()
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=1.0, label_smoothing=0.0, num_classes=C)
    mixed, target = mix(x.clone(), y, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    rng.random(), rng.random()  # mix at all; switch to CutMix
    (yl, yh, xl, xh), lam = cutmix_box(x.shape, rng.beta(1.0, 1.0), rng)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[yl:yh, xl:xh] = True
    assert torch.equal(mixed[:, :, inside], x.flip(0)[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    assert lam == pytest.approx(1 - inside.sum().item() / 64)
    assert torch.allclose(target, mixup_target(y, C, lam, 0.0))


def test_cutmix_box_lambda_is_the_unpasted_share():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.9, 1.0):
        (yl, yh, xl, xh), corrected = cutmix_box((3, 32, 32), lam, rng)
        assert 0 <= yl <= yh <= 32 and 0 <= xl <= xh <= 32
        assert corrected == pytest.approx(1 - (yh - yl) * (xh - xl) / 1024)
    (yl, yh, xl, xh), _ = cutmix_box((3, 32, 32), 0.5, rng, minmax=(0.2, 0.8))
    assert 6 <= yh - yl < 25 and 6 <= xh - xl < 25


def test_no_mixing_still_smooths_the_labels():
    x, y = batch()
    mixed, target = Mixup(prob=0.0, num_classes=C)(x.clone(), y, np.random.default_rng(0))
    assert torch.equal(mixed, x)
    assert torch.allclose(target, smooth_one_hot(y, C, 0.1))


def test_official_settings_switch_between_mixup_and_cutmix():
    mix = Mixup(num_classes=C)  # the official defaults: 0.8 / 1.0 / prob 1 / switch 0.5 / batch / 0.1
    cutmix = 0
    for seed in range(400):
        x, y = batch(seed=seed)
        mixed, target = mix(x.clone(), y, np.random.default_rng(seed))
        assert torch.allclose(target.sum(dim=1), torch.ones(len(y)))
        changed = (mixed != x).flatten(1)
        cutmix += bool(changed.any() and not changed.all())  # a box, not the whole image
    assert 0.4 < cutmix / 400 < 0.6


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_pair_and_elem_modes(mode):
    x, y = batch(b=8)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, mode=mode, label_smoothing=0.0, num_classes=C)
    mixed, target = mix(x.clone(), y, np.random.default_rng(1))
    lams = target[torch.arange(8), y]  # the weight of a sample's own label is its lambda (labels differ)
    differ = y != y.flip(0)
    assert differ.sum() >= 4
    for i in differ.nonzero().flatten().tolist():
        assert torch.allclose(mixed[i], lams[i] * x[i] + (1 - lams[i]) * x.flip(0)[i], atol=1e-5)
        if mode == "pair":  # mirrored samples share one lambda
            assert torch.isclose(lams[i], lams[7 - i])
    assert len(set(lams[differ].tolist())) > 2  # per-sample (per-pair) draws, not one per batch


def test_odd_batch_and_bad_settings():
    x, y = batch(b=5)
    with pytest.raises(ValueError, match="even batch size"):
        Mixup(num_classes=C)(x, y, np.random.default_rng(0))
    with pytest.raises(UserError, match="--mixup_mode"):
        Mixup(mode="sample")
    with pytest.raises(UserError, match="--mixup > 0 or --cutmix > 0"):
        Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)


def test_soft_target_loss_with_smoothing_equals_torch_label_smoothing():
    logits, y = torch.randn(16, C), torch.randint(0, C, (16,))
    soft = soft_target_cross_entropy(logits, smooth_one_hot(y, C, 0.1))
    assert torch.allclose(soft, F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(SoftTargetCrossEntropy()(logits, smooth_one_hot(y, C, 0.0)), F.cross_entropy(logits, y))
    assert torch.allclose(LabelSmoothingCrossEntropy(0.1)(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_criterion_choice_follows_the_official_code():
    assert isinstance(build_criterion(mixup_active=True, smoothing=0.1), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(mixup_active=False, smoothing=0.1), LabelSmoothingCrossEntropy)
    assert isinstance(build_criterion(mixup_active=False, smoothing=0.0), torch.nn.CrossEntropyLoss)
