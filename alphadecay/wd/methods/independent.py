"""Independent weight decay (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322; composer's DecoupledAdamW).

AdamW's decay p <- p - lr_t x wd x p ties the decay's strength to the peak learning rate, so a learning-rate sweep
also sweeps the decay. Independent decay removes (lr_t / lr_max) x wd_ind x p: it keeps the schedule's shape but not
its magnitude, and its decay is on another scale (AdamW's wd = wd_ind / lr_max: wd_ind 1e-4 at lr_max 1e-3 is
AdamW's 0.1). On torch's AdamW that is the group's decay x 1 / lr_max, every group, every update.

lr_max is the option `peak_lr` (x the group's lr_scale) or the group's `initial_lr`; the rule has no state.
"""

from __future__ import annotations

from torch import nn

from alphadecay.wd.scheduler import WDUpdate, peak_lrs


class Independent:
    modules: list[str] = []

    def __init__(self, optimizer, *, peak_lr: float | None = None):
        self.optimizer, self.peak_lr = optimizer, peak_lr

    def step(self, update: int, model: nn.Module) -> WDUpdate:
        return WDUpdate(scales=[1.0 / top for top in peak_lrs(self.optimizer.param_groups, self.peak_lr,
                                                              "independent")])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(model: nn.Module, optimizer, options: dict) -> Independent:
    return Independent(optimizer, peak_lr=options["peak_lr"])
