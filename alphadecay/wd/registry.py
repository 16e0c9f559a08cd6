"""The one weight-decay scheduler interface, the registry of methods, and what differs between model families.

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

`METHODS` is the registry: name -> where its builder lives, and the official flags the name stands for. The
configs' `--wd_scheduler` choices are its keys. A builder is `build(config, model, param_groups, family)`, where
`config` is a TrainConfig or a ViTConfig (the weight-decay flags have the same names in both) and `family` says
which model family's official semantics apply (`Family`). Adding a method is one file with a builder and one line
here (README, "Weight decay").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # this module imports no torch: alphadecay/config.py (read by scripts/ without torch) uses METHODS
    from torch import nn

    from alphadecay.config import FlagConfig


@dataclass
class WDUpdate:
    multipliers: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class WeightDecayScheduler(Protocol):
    def step(self, step: int, model: nn.Module) -> WDUpdate | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Method:
    """A registered weight-decay method."""

    builder: str  # "module:function", imported when a run builds its scheduler
    about: str
    flags: dict[str, Any] = field(default_factory=dict)  # the official flags it stands for; --wd_scheduler sets them


METHODS: dict[str, Method] = {
    "uniform": Method("alphadecay.wd.methods.uniform:build", "one decay for all (the paper's Uniform)"),
    "awd": Method("alphadecay.wd.methods.awd:build", "AWD, Ghiasi et al. 2023 (the paper's baseline1)",
                  {"use_AWD_NeurIPS2023": True}),
    "adadecay": Method("alphadecay.wd.methods.adadecay:build_adadecay", "AdaDecay, Nakamura & Hong 2019 (baseline2)",
                       {"use_modulewise_wd": True, "alpha_positively_with_WD": True,
                        "esd_metric_for_tb": "gradnorm", "assign_func": "layerwise_sigmoid"}),
    "alphadecay": Method("alphadecay.wd.methods.modulewise:build_alphadecay", "AlphaDecay, He et al. 2025",
                         {"use_modulewise_wd": True, "alpha_positively_with_WD": True,
                          "esd_metric_for_tb": "alpha", "assign_func": "tb_linear_map"}),
}


@dataclass(frozen=True)
class Family:
    """Where the authors' two codebases run the same method differently; each scheduler reads what concerns it.

    llama (LLaMa-pretraining/): the module-wise pass runs at update 0 on the initial weights with no gradients
    (gradient norms are the placeholder 10) and whenever (update + 1) % --unbalancedWD_every == 0; matrices with
    fewer than 50 eigenvalues are dropped only for spectral metrics.
    vit (ViT-training/): the pass runs at the first update of every epoch (`updates_per_epoch`), after the backward
    pass, so on real gradients, and --unbalancedWD_every is ignored (ViT-training/engine.py:57, 96-100); the
    50-eigenvalue filter always applies. (The official ViT code also runs a pass at initialisation, but the
    epoch-0 pass overwrites its decays before the first optimizer step, on the same weights: it changes nothing.)
    What the families share: every Linear and Conv2d in module order is a candidate, minus the first and the last
    (LLaMA: layer-0 q_proj and lm_head; ViT: the patch Conv2d and the head); AdaDecay's blocks are the transformer
    block index (`model.layers.<i>` / `blocks.<i>`). AWD's multiplier is a flag whose default is the family's
    (--awd_multiplier: 100 for LLaMA, 50 for the ViT).
    """

    name: str
    updates_per_epoch: int | None = None  # vit only

    def __post_init__(self) -> None:
        if (self.name == "vit") != (self.updates_per_epoch is not None):
            raise ValueError("Family: updates_per_epoch is given for the vit family and only for it")


LLAMA = Family("llama")


def vit_family(updates_per_epoch: int) -> Family:
    return Family("vit", updates_per_epoch)


def build_wd_scheduler(config: FlagConfig, model: nn.Module, param_groups: list[dict],
                       family: Family = LLAMA) -> WeightDecayScheduler:
    """The scheduler the configuration selects (--wd_scheduler, or the official flags), from the registry."""
    module_name, function = METHODS[config.wd_method()].builder.split(":")
    return getattr(importlib.import_module(module_name), function)(config, model, param_groups, family)
