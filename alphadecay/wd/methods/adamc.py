"""AdamC: corrected weight decay (Defazio, Ke, Mishchenko et al. 2025, arXiv 2506.02285).

With AdamW's decoupled decay p <- p - lr_t x wd x p, a layer followed by a normalisation settles where its weight
norm balances the update, and as lr_t falls at the end of a schedule that balance drives the gradient norm up.
AdamC makes the decay follow the schedule: wd_t = wd x lr_t / lr_max, so an update removes (lr_t^2 / lr_max) x wd x p.
The paper motivates it for normalised (matrix) layers; which groups its LLM runs corrected is not stated in the
shared notes (timm's corrected_weight_decay scales every group, and its groups put vectors at decay 0). Here
`adamc_groups='matrices'` (default) corrects the groups holding a parameter with two or more dimensions larger
than 1 (weight matrices, convolution kernels, embeddings); norms, biases-only groups and the ViT's cls_token keep
AdamW's decay. `adamc_groups='all'` corrects every group.

lr_t is each group's `lr` when step() runs (whatever set it), lr_max the option `peak_lr` (x the group's lr_scale)
or the group's `initial_lr`. Nothing is cached: the rule has no state.
"""

from __future__ import annotations

from torch import nn

from alphadecay.wd.scheduler import WDUpdate, peak_lrs


def is_matrix_group(group: dict) -> bool:
    """Whether a group holds a parameter with two or more dimensions larger than 1."""
    return any(sum(size > 1 for size in p.shape) >= 2 for p in group["params"])


class AdamC:
    modules: list[str] = []  # a factor for every group, no module multipliers

    def __init__(self, optimizer, *, peak_lr: float | None = None, groups: str = "matrices"):
        self.optimizer, self.peak_lr, self.groups = optimizer, peak_lr, groups

    def step(self, update: int, model: nn.Module) -> WDUpdate:
        groups = self.optimizer.param_groups
        lr_max = peak_lrs(groups, self.peak_lr, "adamc")
        scales = [float(g["lr"]) / top if self.groups == "all" or is_matrix_group(g) else 1.0
                  for g, top in zip(groups, lr_max)]
        return WDUpdate(scales=scales)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(model: nn.Module, optimizer, options: dict) -> AdamC:
    return AdamC(optimizer, peak_lr=options["peak_lr"], groups=options["adamc_groups"])
