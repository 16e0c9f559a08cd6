"""The optimizer and the learning-rate schedule.

`adam` is torch Adam: its weight decay is coupled L2 (`g += wd * p` before the moments), as in the paper's Adam
table. `adamw` is decoupled (`p *= 1 - lr * wd`), so the decay follows the learning-rate schedule. Both are fused
on CUDA.

The schedule is the official GaLore/AlphaDecay one (training_utils.py:56-71): factor step/warmup during warmup
(so update 0 uses lr 0), then cosine (or linear) from 1 down to --min_lr_ratio at the last update. Unlike the
official loop we run exactly --num_training_steps updates; the official extra update uses factor 1e-7.
"""

from __future__ import annotations

import math

import torch

from alphadecay.config import TrainConfig


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for update `step` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer]
    kwargs = {"lr": config.lr, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return cls(param_groups, **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
