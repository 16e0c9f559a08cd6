"""AWD: Adaptive Weight Decay (Ghiasi, Shafahi, Ardekani, NeurIPS 2023), the AlphaDecay paper's baseline1.

Every update: lambda_t = lambda_awd * ||g|| / (||w|| + 1e-8) over all parameters, and the moving average
lambda_bar <- 0.1 * lambda_bar + 0.9 * lambda_t (lambda_bar starts at 0), applied to every group
(official AWD_nips2023.py). lambda_awd = --awd_multiplier x --weight_decay; the multiplier's default is the
official code's for the model family: 100 for LLaMA, 50 for the ViT (ViT-training/main.py:270).
As a multiplier of each group's base decay (--weight_decay for every group in the paper's setting), the
group's decay is base * lambda_bar / --weight_decay, i.e. lambda_bar itself.

The norms cost one host transfer per update (torch._foreach_norm), not two per parameter as in the official code.
The gradients are already reduced across ranks; lambda_t is still broadcast from rank 0 so replicas can never drift.
The official ViT code steps AWD on every micro-batch (ViT-training/engine.py:90-91), on the partial gradient
accumulated so far; we step it once per update on the whole gradient. The two are the same with --update_freq 1,
as in every official ViT script.
"""

from __future__ import annotations

import torch
from torch import nn

from alphadecay import dist
from alphadecay.wd.registry import Family, WDUpdate


def global_norms(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(||g||, ||w||) over every parameter that has a gradient, as 0-dim float64 tensors on the model's device."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = torch.stack([n.double() for n in torch._foreach_norm([p.grad for p in params])])
    weights = torch.stack([n.double() for n in torch._foreach_norm([p.detach() for p in params])])
    return grads.pow(2).sum().sqrt(), weights.pow(2).sum().sqrt()


class AWD:
    def __init__(self, group_names: list[str], *, weight_decay: float, multiplier: float = 100.0):
        self.group_names = list(group_names)
        self.weight_decay = weight_decay
        self.lambda_awd = multiplier * weight_decay
        self.lambda_bar = 0.0

    def step(self, step: int, model: nn.Module) -> WDUpdate:
        grad_norm, weight_norm = global_norms(model)
        lambda_t = self.lambda_awd * grad_norm / (weight_norm + 1e-8)
        lambda_t = float(dist.broadcast_tensor(lambda_t.reshape(1)).item())
        self.lambda_bar = 0.1 * self.lambda_bar + 0.9 * lambda_t
        multiplier = self.lambda_bar / self.weight_decay
        return WDUpdate(multipliers={name: multiplier for name in self.group_names},
                        metrics={"awd/lambda_t": lambda_t, "awd/lambda_bar": self.lambda_bar})

    def state_dict(self) -> dict:
        return {"lambda_bar": self.lambda_bar}

    def load_state_dict(self, state: dict) -> None:
        self.lambda_bar = float(state["lambda_bar"])


def build(config, model: nn.Module, param_groups: list[dict], family: Family) -> AWD:
    """--wd_scheduler awd (or --use_AWD_NeurIPS2023): one multiplier for every group."""
    return AWD([g["name"] for g in param_groups], weight_decay=config.weight_decay, multiplier=config.awd_multiplier)
