"""AWD: Adaptive Weight Decay (Ghiasi, Shafahi, Ardekani, NeurIPS 2023), the AlphaDecay paper's baseline1.

Every update: lambda_t = lambda_awd * ||g|| / (||w|| + 1e-8) over all parameters, and the moving average
lambda_bar <- 0.1 * lambda_bar + 0.9 * lambda_t (lambda_bar starts at 0), applied to every group
(official AWD_nips2023.py). lambda_awd = --awd_multiplier x --weight_decay; the multiplier's default is the
official code's for the model family: 100 for LLaMA, 50 for the ViT (ViT-training/main.py:270).
As a multiplier of each group's base decay (--weight_decay for every group in the paper's setting), the
group's decay is base * lambda_bar / --weight_decay, i.e. lambda_bar itself. `step()` raises when no parameter has
a gradient (it was called before backward() or after zero_grad()).

The norms cost one host transfer per update (torch._foreach_norm), not two per parameter as in the official code;
on FSDP's DTensor shards, one all-reduce of the shards' squared norms (alphadecay/wd/norms.py).
The gradients are already reduced across ranks; lambda_t is still broadcast from rank 0 so replicas can never drift.
The official ViT code steps AWD on every micro-batch (ViT-training/engine.py:90-91), on the partial gradient
accumulated so far; we step it once per update on the whole gradient. The two are the same with --update_freq 1,
as in every official ViT script.
"""

from __future__ import annotations

import torch
from torch import nn

from alphadecay import dist
from alphadecay.wd.norms import global_norm
from alphadecay.wd.registry import WeightDecayError
from alphadecay.wd.scheduler import WDUpdate


def global_norms(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(||g||, ||w||) over every parameter that has a gradient, as 0-dim float64 tensors on the model's device."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise WeightDecayError("AWD scales the decay by ||g|| / ||w||, but no parameter has a gradient: call the "
                               "scheduler's step() after loss.backward() (and clipping) and before optimizer.step() / "
                               "zero_grad(), once per optimizer update.")
    return global_norm([p.grad for p in params]), global_norm([p.detach() for p in params])


class AWD:
    modules: list[str] = []  # one decay for every group

    def __init__(self, *, weight_decay: float, multiplier: float = 100.0):
        if not weight_decay > 0:
            raise WeightDecayError(f"AWD sets lambda_awd = awd_multiplier x weight_decay; weight_decay must be > 0, "
                                   f"got {weight_decay!r}.")
        self.weight_decay = weight_decay
        self.lambda_awd = multiplier * weight_decay
        self.lambda_bar = 0.0

    def step(self, step: int, model: nn.Module) -> WDUpdate:
        grad_norm, weight_norm = global_norms(model)
        lambda_t = self.lambda_awd * grad_norm / (weight_norm + 1e-8)
        lambda_t = float(dist.broadcast_tensor(lambda_t.reshape(1)).item())
        self.lambda_bar = 0.1 * self.lambda_bar + 0.9 * lambda_t
        return WDUpdate(every_group=self.lambda_bar / self.weight_decay,
                        metrics={"awd/lambda_t": lambda_t, "awd/lambda_bar": self.lambda_bar})

    def state_dict(self) -> dict:
        return {"lambda_bar": self.lambda_bar}

    def load_state_dict(self, state: dict) -> None:
        self.lambda_bar = float(state["lambda_bar"])


def build(model: nn.Module, optimizer, options: dict) -> AWD:
    """One multiplier for every group; weight_decay defaults to the largest base decay of the optimizer's groups
    (the trainers pass --weight_decay)."""
    weight_decay = options["weight_decay"]
    if weight_decay is None:
        weight_decay = max(g.get("base_weight_decay", g["weight_decay"]) for g in optimizer.param_groups)
    return AWD(weight_decay=weight_decay, multiplier=options["awd_multiplier"])
