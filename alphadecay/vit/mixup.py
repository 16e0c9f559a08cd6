"""Mixup/CutMix with label smoothing inside the soft targets, and the losses that read them (timm 0.4.5's
`timm/data/mixup.py` and `timm/loss/cross_entropy.py`), with draws from an explicit numpy Generator.

Official flags: `--mixup 0.8 --cutmix 1.0 --mixup_prob 1.0 --mixup_switch_prob 0.5 --mixup_mode batch
--smoothing 0.1`. Per batch: with probability `prob` mix at all; then CutMix with probability `switch_prob`
(lambda ~ Beta(1, 1)), else Mixup (lambda ~ Beta(0.8, 0.8)). Every sample is mixed with the sample at the mirrored
position of the batch (`x.flip(0)`). CutMix pastes a box of area ~(1 - lambda) (clipped at the image borders,
lambda then corrected to the pasted share). The targets are
    lambda * smooth(y) + (1 - lambda) * smooth(y.flip(0)),   smooth(y) = one_hot(y) * (1 - s) + s / num_classes,
so label smoothing applies even when no mixing happens, and the loss is SoftTargetCrossEntropy. With Mixup and
CutMix both off the official code uses LabelSmoothingCrossEntropy (`smoothing` > 0) or plain cross-entropy.

Modes: `batch` (one lambda for the batch; official), `pair` and `elem` (per pair / per element), as timm. The
batch must have an even size (timm's assertion; a ValueError here).

Determinism: `Mixup.__call__(x, target, rng)` draws only from `rng`; `transforms.batch_rng(seed, epoch, step,
rank)` gives a generator per micro-batch, so a resumed run mixes as the uninterrupted one did.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alphadecay.errors import UserError

MODES = ("batch", "pair", "elem")


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, num_classes) float32: 1 - smoothing + smoothing / num_classes at the label, smoothing / num_classes
    elsewhere (timm's one_hot with on/off values)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((target.shape[0], num_classes), off, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on)


def mixup_target(target: torch.Tensor, num_classes: int, lam: float | torch.Tensor,
                 smoothing: float) -> torch.Tensor:
    """lam * smooth(target) + (1 - lam) * smooth(target.flip(0)); `lam` a float or a (B, 1) tensor."""
    y1 = smooth_one_hot(target, num_classes, smoothing)
    y2 = smooth_one_hot(target.flip(0), num_classes, smoothing)
    return y1 * lam + y2 * (1.0 - lam)


def cutmix_box(img_shape: tuple[int, ...], lam: float, rng: np.random.Generator,
               minmax: tuple[float, float] | None = None) -> tuple[tuple[int, int, int, int], float]:
    """((y_lo, y_hi, x_lo, x_hi), corrected lambda) of timm's `cutmix_bbox_and_lam` (correct_lam=True).

    Without `minmax` the box is centred uniformly in the image with sides int(side * sqrt(1 - lam)), clipped at
    the borders; with it, each side is a uniform share of the image in [min, max). Lambda becomes
    1 - (box area / image area)."""
    img_h, img_w = img_shape[-2:]
    if minmax is not None:
        cut_h = int(rng.integers(int(img_h * minmax[0]), int(img_h * minmax[1])))
        cut_w = int(rng.integers(int(img_w * minmax[0]), int(img_w * minmax[1])))
        yl, xl = int(rng.integers(0, img_h - cut_h)), int(rng.integers(0, img_w - cut_w))
        yh, xh = yl + cut_h, xl + cut_w
    else:
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
        cy, cx = int(rng.integers(0, img_h)), int(rng.integers(0, img_w))
        yl, yh = int(np.clip(cy - cut_h // 2, 0, img_h)), int(np.clip(cy + cut_h // 2, 0, img_h))
        xl, xh = int(np.clip(cx - cut_w // 2, 0, img_w)), int(np.clip(cx + cut_w // 2, 0, img_w))
    lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
    return (yl, yh, xl, xh), lam


class Mixup:
    """`__call__(x, target, rng) -> (mixed x, soft targets)`; `x` (B, C, H, W) is mixed in place."""

    def __init__(self, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: tuple[float, float] | None = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = "batch", label_smoothing: float = 0.1, num_classes: int = 1000) -> None:
        if mode not in MODES:
            raise UserError(f"--mixup_mode {mode}: valid modes are {', '.join(MODES)}.")
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2 or not 0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1:
                raise UserError(f"--cutmix_minmax {cutmix_minmax}: two ratios 0 < min < max <= 1.")
            cutmix_alpha = 1.0  # timm forces it, to keep one code path
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise UserError("Mixup needs --mixup > 0 or --cutmix > 0 (or --cutmix_minmax); with both 0 leave it off.")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"--smoothing {label_smoothing}: must be in [0, 1).")
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def _draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """One (lambda, use_cutmix); lambda 1 means no mixing. timm's `_params_per_batch` draw order."""
        if rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            return float(rng.beta(alpha, alpha)), use_cutmix
        if self.mixup_alpha > 0:
            return float(rng.beta(self.mixup_alpha, self.mixup_alpha)), False
        return float(rng.beta(self.cutmix_alpha, self.cutmix_alpha)), True

    def _draw_many(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n independent (lambda, use_cutmix) pairs: timm's `_params_per_elem` draw order."""
        lam, use_cutmix = np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(n) < self.switch_prob
            lam_mix = np.where(use_cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=n),
                               rng.beta(self.mixup_alpha, self.mixup_alpha, size=n))
        elif self.mixup_alpha > 0:
            lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, size=n)
        else:
            use_cutmix = np.ones(n, dtype=bool)
            lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
        lam = np.where(rng.random(n) < self.prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _mix_batch(self, x: torch.Tensor, rng: np.random.Generator) -> float:
        lam, use_cutmix = self._draw(rng)
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_box(x.shape, lam, rng, self.cutmix_minmax)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam

    def _mix_each(self, x: torch.Tensor, rng: np.random.Generator, pairs: bool) -> torch.Tensor:
        """Per element (`elem`) or per mirrored pair (`pair`, both halves get the same lambda and box)."""
        batch = len(x)
        count = batch // 2 if pairs else batch
        lams, use_cutmix = self._draw_many(count, rng)
        original = x.clone()
        for i in range(count):
            j = batch - i - 1
            lam = float(lams[i])
            if lam == 1.0:
                continue
            if use_cutmix[i]:
                (yl, yh, xl, xh), lam = cutmix_box(x[i].shape, lam, rng, self.cutmix_minmax)
                x[i][:, yl:yh, xl:xh] = original[j][:, yl:yh, xl:xh]
                if pairs:
                    x[j][:, yl:yh, xl:xh] = original[i][:, yl:yh, xl:xh]
                lams[i] = lam
            else:
                x[i] = x[i] * lam + original[j] * (1 - lam)
                if pairs:
                    x[j] = x[j] * lam + original[i] * (1 - lam)
        if pairs:
            lams = np.concatenate((lams, lams[::-1]))
        return torch.tensor(lams, device=x.device, dtype=x.dtype).unsqueeze(1)

    def __call__(self, x: torch.Tensor, target: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch size, got {len(x)}")
        if self.mode == "batch":
            lam: float | torch.Tensor = self._mix_batch(x, rng)
        else:
            lam = self._mix_each(x, rng, pairs=self.mode == "pair")
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)

    def __repr__(self) -> str:
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"cutmix_minmax={self.cutmix_minmax}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"mode={self.mode}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes})")


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c target_c log softmax(logits)_c (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def label_smoothing_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(1 - s) * NLL(target) + s * mean_c(-log p_c), batch mean (timm's LabelSmoothingCrossEntropy)."""
    logprobs = F.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return ((1.0 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)).mean()


class SoftTargetCrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(logits, target)


class LabelSmoothingCrossEntropy(nn.Module):
    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0 <= smoothing < 1:
            raise UserError(f"--smoothing {smoothing}: must be in [0, 1).")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothing_cross_entropy(logits, target, self.smoothing)


def build_criterion(*, mixup_active: bool, smoothing: float) -> nn.Module:
    """The official choice: soft-target CE with Mixup/CutMix, else label-smoothing CE (smoothing > 0), else CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()
