"""Uniform weight decay: every group keeps its base decay (the paper's "Uniform" / plain Adam(W))."""

from __future__ import annotations

from torch import nn

from alphadecay.wd.registry import Family, WDUpdate


class Uniform:
    """Does nothing: the groups are built at their base decay, one value for all in the paper's setting."""

    def step(self, step: int, model: nn.Module) -> WDUpdate | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(config, model: nn.Module, param_groups: list[dict], family: Family) -> Uniform:
    """--wd_scheduler uniform (or none of the official method flags); the same for every model family."""
    return Uniform()
