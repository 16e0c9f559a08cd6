"""The one weight-decay scheduler interface, and the table that builds a scheduler from the configuration.

Every method implements `WeightDecayScheduler`:

    step(step, model) -> WDUpdate | None
        Called once per optimizer update, after the gradients are reduced across ranks (and clipped), before
        `optimizer.step()`. `step` is the 0-based update index; `model` is the unwrapped model (no DDP).
        Returns per-group decay *multipliers* (group name -> m; the group's decay becomes base_weight_decay * m,
        groups not named keep theirs) and scalars to log, or None when nothing changes.
        The result must be identical on every rank.
    state_dict() / load_state_dict(state)
        Everything needed to resume exactly (AWD's moving average, the last multipliers, ...).

Schedulers never touch the optimizer: the trainer applies the multipliers with
`param_groups.apply_multipliers`. The decay value is torch's: coupled L2 for Adam, `lr * wd * p` for AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import nn

from alphadecay.config import TrainConfig


@dataclass
class WDUpdate:
    multipliers: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class WeightDecayScheduler(Protocol):
    def step(self, step: int, model: nn.Module) -> WDUpdate | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_wd_scheduler(config: TrainConfig, model: nn.Module, param_groups: list[dict]) -> WeightDecayScheduler:
    """The only place that knows every method: --wd_scheduler (or the official flags) -> scheduler."""
    method = config.wd_method()
    if method == "uniform":
        from baselines.uniform import Uniform

        return Uniform()
    if method == "awd":
        from baselines.awd import AWD

        return AWD([g["name"] for g in param_groups], weight_decay=config.weight_decay, multiplier=config.awd_multiplier)
    if method == "adadecay":
        from baselines.adadecay import build_adadecay

        return build_adadecay(config, model, param_groups)
    from alphadecay.modulewise import ModulewiseDecay

    return ModulewiseDecay.from_config(config, model, param_groups)
