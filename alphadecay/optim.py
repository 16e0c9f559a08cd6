"""The optimizer and the learning-rate schedule.

`adam` is torch Adam: its weight decay is coupled L2 (`g += wd * p` before the moments), as in the paper's Adam
table. `adamw` is decoupled (`p *= 1 - lr * wd`), so the decay follows the learning-rate schedule.

Which of torch's kernels runs them (--optimizer_impl) changes the numbers in pure bf16. torch's `foreach` (and
`forloop`) Adam rounds every intermediate tensor to the parameter dtype: `grad + wd * p` is rounded to bf16
before the moments, so a coupled decay far below the gradient's bf16 resolution (wd 1e-6 with |p| ~ 0.02 against
gradients ~1e-4) is mostly lost. The `fused` kernel does the arithmetic in fp32 and rounds the moments and the
parameter once. On bf16 parameters with those magnitudes, over 20 steps, foreach applied about 0.17x the decay of
an exact (float64) Adam and fused about 1.2x (tests/test_optim.py). The authors' `torch.optim.Adam(params, lr,
weight_decay=wd)` on CUDA gets torch's default, foreach (torch 2.5.1, as 2.13), and their AdamW asks for fused:
`--optimizer_impl official` (the default) reproduces exactly that, so the paper's Adam numbers carry the lost
decay; `fused` applies the decay the paper's formula says.

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


def resolve_optimizer_impl(impl: str, optimizer: str, device: torch.device) -> str:
    """The kernel --optimizer_impl selects: foreach, fused or forloop.

    `official` is what the authors' code gets (torchrun_main.py:358-361, :32-45): Adam without arguments, which
    torch runs as foreach on CUDA and as the for-loop on CPU; AdamW with fused=True when on CUDA, else the same
    default.
    """
    if impl != "official":
        return impl
    if device.type != "cuda":
        return "forloop"
    return "fused" if optimizer == "adamw" else "foreach"


def build_optimizer(param_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return make_optimizer(param_groups, name=config.optimizer, lr=config.lr,
                          betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                          impl=config.optimizer_impl, device=device)


def make_optimizer(param_groups: list[dict], *, name: str, lr: float, betas: tuple[float, float], eps: float,
                   impl: str, device: torch.device) -> torch.optim.Optimizer:
    """torch Adam or AdamW over the named groups, on the kernel --optimizer_impl resolves to (any model family)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    kwargs = {"lr": lr, "betas": betas, "eps": eps}
    impl = resolve_optimizer_impl(impl, name, device)
    kwargs.update({"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}[impl])
    return cls(param_groups, **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
