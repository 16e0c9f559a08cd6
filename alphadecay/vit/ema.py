"""Model EMA as the official ViT code uses timm 0.4.5's `ModelEma` (`--model_ema`, `--model_ema_decay 0.9999`).

A copy of the model, made once the model is on its device and before DDP wraps it, updated after every optimizer
step (not every micro-batch) with

    ema = ema * decay + (1 - decay) * model        for every floating-point entry of the state_dict,

with no warm-up (the decay is constant from the first update), in eval mode and without gradients. timm's update
runs over every state_dict entry; integer buffers (none in a ViT) are copied here instead of averaged and
truncated. The evaluation (`--model_ema_eval`) runs the copy as a normal model: `ema.module(images)`.

Resume: `state_dict()` is the averaged model's own state_dict (loadable into a bare model, as timm's
`state_dict_ema` in the official checkpoints); `load_state_dict` restores it. Nothing else is state: the decay is
a flag and there is no update counter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (`.module`) and/or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ModelEma:
    """`update(model)` after each optimizer step; `module` is the averaged model."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = unwrap(model).state_dict()
        decay = self.decay
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.is_floating_point():
                ema_value.copy_(ema_value * decay + (1.0 - decay) * value)  # timm's expression, term for term
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
