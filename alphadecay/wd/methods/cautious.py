"""Cautious weight decay (Chen et al. 2025, arXiv 2510.12402).

    p <- p - lr_t x (u + wd x 1[u * p >= 0] * p),   u = Adam's update m_hat / (sqrt(v_hat) + eps)

decays only the entries where the update and the weight have the same sign (where the update already moves the
weight towards zero), so the decay never fights the loss. A per-element mask, not a group multiplier: the rule
applies it itself (`apply_decay`) and the scheduler gives torch's AdamW weight_decay 0 in every group. Each group's
wd is its effective decay (base x multiplier: AlphaDecay's module-wise multipliers in `alphadecay+cautious`).

Exactness on torch's AdamW. torch applies p <- p x (1 - lr_t x wd) to the pre-update p and then the Adam step,
which does not read p; applying the masked decay to p before optimizer.step() (whose own decay is 0) is therefore
the same update, with any of torch's kernels. The sign of u is that of m_tilde = beta1 x exp_avg + (1 - beta1) x g,
the first moment the step is about to compute (the bias correction and the denominator are positive), computed
here as torch's kernels do (exp_avg.lerp(g, 1 - beta1); exp_avg = 0 before a parameter's first step). Conventions:
mask = 1 where m_tilde x p >= 0, so entries where the update is 0 (no gradient signal yet, e.g. an embedding row
that has not been seen) are decayed, as the paper's indicator 1[u * p >= 0] says; entries where p = 0 are not
changed either way. Only parameters that have a gradient are decayed, as torch's AdamW steps only those. Not
defined here for maximize=True (the update's sign flips).

Cost: foreach ops over each group's parameters, one temporary the size of the parameters, and one host sync for
the logged fraction of entries decayed (`cautious/decayed_fraction`). The rule has no state.
"""

from __future__ import annotations

import torch
from torch import nn

from alphadecay.wd.registry import WeightDecayError
from alphadecay.wd.scheduler import adam_moments, decoupled_adam


class Cautious:
    modules: list[str] = []

    def __init__(self, optimizer):
        self.adam = decoupled_adam(optimizer, "cautious")
        if any(g.get("maximize", False) for g in self.adam.param_groups):
            raise WeightDecayError("weight-decay method 'cautious' reads the sign of Adam's update, which "
                                   "maximize=True flips; it is not defined here for maximize.")

    def step(self, update: int, model: nn.Module) -> None:
        return None  # the decays are the groups' own; the mask is applied in apply_decay

    @torch.no_grad()
    def apply_decay(self, groups: list[dict]) -> dict[str, float]:
        counts, total = [], 0
        for group in groups:
            decay, lr = group["effective_weight_decay"], float(group["lr"])
            params, grads, states, fresh, fresh_grads = adam_moments(self.adam, group)
            if decay == 0 or lr == 0 or not (params or fresh):
                continue
            beta1 = float(group["betas"][0])
            # m_tilde, the first moment optimizer.step() will compute, into one temporary per parameter
            agree = list(torch._foreach_lerp([s["exp_avg"] for s in states], grads, 1.0 - beta1)) if params else []
            agree += list(torch._foreach_mul(fresh_grads, 1.0 - beta1)) if fresh else []
            params = params + fresh
            torch._foreach_mul_(agree, params)  # m_tilde x p
            torch._foreach_sign_(agree)  # -1, 0, 1
            torch._foreach_add_(agree, 1.0)
            torch._foreach_clamp_max_(agree, 1.0)  # the mask: 1 where m_tilde x p >= 0, else 0
            counts.append(torch.stack(torch._foreach_norm(agree, 1)).double().sum())  # entries decayed
            total += sum(p.numel() for p in params)
            torch._foreach_mul_(agree, params)  # mask x p
            torch._foreach_add_(params, agree, alpha=-lr * decay)  # p <- p - lr_t x wd x mask x p
        return {"cautious/decayed_fraction": float(torch.stack(counts).sum()) / total} if total else {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(model: nn.Module, optimizer, options: dict) -> Cautious:
    return Cautious(optimizer)
