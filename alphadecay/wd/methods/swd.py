"""Stable weight decay, AdamS (Xie, Xu, Zhang, Sato, Sugiyama, NeurIPS 2023, "On the Overlooked Pitfalls of Weight
Decay and How to Mitigate Them"; arXiv 2011.11152; official code zeke-xie/stable-weight-decay-regularization,
swd_optim/adams.py).

    p <- p - lr_t x wd / sqrt(v_bar_t) x p - lr_t x u

v_bar_t is the mean, over every entry of every parameter that has a gradient, of Adam's bias-corrected second moment
v_t / (1 - beta2^t) including this update's gradient (v_t = beta2 x exp_avg_sq + (1 - beta2) x g^2, computed before
optimizer.step() updates exp_avg_sq). As in AdamS, one global factor: every group's decay x 1 / sqrt(v_bar_t),
applied by torch's AdamW to the pre-update p, as AdamS does. The decay is on its own scale (AdamS's README uses
5e-4 with lr 1e-3 on CIFAR): wd / sqrt(v_bar) is AdamW's decay, and sqrt(v_bar) is of the order of a gradient entry.

v_bar is summed per tensor (sum of exp_avg_sq as its L1 norm, sum of g^2 as its squared L2 norm), so it costs two
foreach norms and one host sync per update; it is broadcast from rank 0 so replicas never drift. v_bar = 0 (no
gradient has ever been non-zero) gives no decay for that update, where AdamS would divide by zero. AMSGrad (AdamS's
amsgrad uses max_exp_avg_sq) is not implemented here. The rule has no state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alphadecay import dist
from alphadecay.wd.registry import WeightDecayError
from alphadecay.wd.scheduler import WDUpdate, adam_moments, decoupled_adam


class StableWeightDecay:
    modules: list[str] = []

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.adam = decoupled_adam(optimizer, "swd")
        if any(g.get("amsgrad", False) for g in self.adam.param_groups):
            raise WeightDecayError("weight-decay method 'swd' averages Adam's exp_avg_sq; AdamS's AMSGrad variant "
                                   "(max_exp_avg_sq) is not implemented here: use amsgrad=False.")

    @torch.no_grad()
    def mean_second_moment(self) -> torch.Tensor:
        """v_bar_t, a 0-dim float64 tensor on the parameters' device."""
        sums, entries = [], 0
        for group in self.optimizer.param_groups:
            params, grads, states, fresh, fresh_grads = adam_moments(self.adam, group)
            beta2 = float(group["betas"][1])
            if params:  # (beta2 x sum(v) + (1 - beta2) x sum(g^2)) / (1 - beta2^(step + 1)), per tensor
                v = torch.stack(torch._foreach_norm([s["exp_avg_sq"] for s in states], 1)).double()
                g2 = torch.stack(torch._foreach_norm(grads, 2)).double() ** 2
                steps = torch.stack([torch.as_tensor(s["step"]) for s in states]).to(v.device, torch.float64)
                sums.append(((beta2 * v + (1 - beta2) * g2) / (1 - beta2 ** (steps + 1))).sum())
            if fresh:  # the first step: v_1 = (1 - beta2) g^2, bias correction 1 - beta2
                sums.append((torch.stack(torch._foreach_norm(fresh_grads, 2)).double() ** 2).sum())
            entries += sum(p.numel() for p in params + fresh)
        if not entries:
            raise WeightDecayError("SWD divides the decay by the root mean of Adam's second moment, but no parameter "
                                   "has a gradient: call the scheduler's step() after loss.backward() (and "
                                   "clipping) and before optimizer.step() / zero_grad(), once per optimizer update.")
        return torch.stack([s.to(sums[0].device) for s in sums]).sum() / entries

    def step(self, update: int, model: nn.Module) -> WDUpdate:
        v_bar = float(dist.broadcast_tensor(self.mean_second_moment().reshape(1)).item())
        scale = 1.0 / math.sqrt(v_bar) if v_bar > 0 else 0.0
        return WDUpdate(scales=[scale] * len(self.optimizer.param_groups),
                        metrics={"swd/sqrt_v_bar": math.sqrt(v_bar)})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(model: nn.Module, optimizer, options: dict) -> StableWeightDecay:
    return StableWeightDecay(optimizer)
