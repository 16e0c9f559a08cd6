"""Uniform weight decay: every group keeps its base decay (the paper's "Uniform" / plain Adam(W))."""

from __future__ import annotations

from torch import nn

from alphadecay.wd.scheduler import WDUpdate


class Uniform:
    """Does nothing: the groups are built at their base decay, one value for all in the paper's setting."""

    modules: list[str] = []

    def step(self, step: int, model: nn.Module) -> WDUpdate | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(model: nn.Module, optimizer, options: dict) -> Uniform:
    return Uniform()
