"""The object `alphadecay.wd.create` returns: a method's rule bound to a model and an optimizer.

    scheduler = alphadecay.wd.create("alphadecay", model, optimizer, every=500)
    ...
    loss.backward()                      # (and clipping)
    metrics = scheduler.step()           # once per optimizer update, before optimizer.step()
    optimizer.step()

`step()` counts the updates itself and asks the rule (alphadecay/wd/registry.py) for decay multipliers, then writes
each group's `weight_decay = base_weight_decay x multiplier`. It returns what to log — the rule's metrics plus
`wd/<module>` for every module whose decay it set, the per-type means and the parameter-weighted mean multiplier
— or None when nothing changed.

Decays reach the optimizer by name, never by position. A tuned module's group is found, at every change (torch's
`Optimizer.load_state_dict` replaces the group dicts), by the group's `"name"` (module_param_groups sets it),
else torch's `"param_names"` (an optimizer built from `named_parameters()`), else by the identity of the module's
weight among the group's parameters. Each tuned module must have its own group: one that holds its weight and
bias and no other tuned module. A group's base decay is its `base_weight_decay` key, which the scheduler sets from
the group's `weight_decay` the first time it sees a group without one; it travels in the optimizer's state_dict.

Wrappers are transparent: DDP (`.module`), `torch.compile` (`._orig_mod`), accelerate's prepared model (DDP or
the model) and optimizer (its `param_groups` are the inner optimizer's).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import nn

from alphadecay.wd.groups import module_kind, tied_modules, weight_modules
from alphadecay.wd.registry import WeightDecayError, method, options_from_flags, resolve_options

# the paper's per-type summaries, under the official wandb key names (torchrun_main.py:504-514), then the ViT's
TYPE_KEYS = {"q": "Q", "k": "K", "v": "V", "o": "O", "gate": "MLPgate", "up": "MLPup", "down": "MLPdown",
             "qkv": "QKV", "proj": "AttnProj", "fc1": "MLPfc1", "fc2": "MLPfc2"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WDUpdate:
    """What a rule's step returns: multipliers of module groups' base decays (`modules`), or of every group's
    (`every_group`), and scalars to log."""

    __slots__ = ("modules", "every_group", "metrics")

    def __init__(self, modules: dict[str, float] | None = None, metrics: dict[str, float] | None = None, *,
                 every_group: float | None = None):
        self.modules = dict(modules or {})
        self.every_group = every_group
        self.metrics = dict(metrics or {})


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel, torch.compile's OptimizedModule and accelerate's wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


class Scheduler:
    def __init__(self, name: str, rule: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.name, self.rule, self.model, self.optimizer = name, rule, model, optimizer
        self.update = 0  # step() calls completed: the next step() is optimizer update number `update`
        tied = tied_modules(model)  # a tied head is its embedding: no group of its own, never tuned
        self.modules = {n: m for n, m in weight_modules(model) if n not in tied}
        self._weight_owner = {id(m.weight): n for n, m in self.modules.items()}
        for group in optimizer.param_groups:
            group.setdefault("base_weight_decay", group["weight_decay"])
            group.setdefault("wd_multiplier", 1.0)
        self.module_groups()  # checks that every tuned module has a group of its own, before any training

    # -- the groups, by name -------------------------------------------------------------------------------------
    def _group_modules(self, group: dict) -> set[str]:
        """The weight modules whose weight `group` holds, by its name, its param_names, or parameter identity."""
        if "name" in group and _strip(str(group["name"])) in self.modules:
            return {_strip(str(group["name"]))}
        if group.get("param_names"):
            names = {_strip(n).rsplit(".", 1)[0] for n in group["param_names"]}
            return {n for n in names if n in self.modules and self._holds_weight(group, n)}
        return {self._weight_owner[id(p)] for p in group["params"] if id(p) in self._weight_owner}

    def _holds_weight(self, group: dict, module: str) -> bool:
        weight = self.modules[module].weight
        return any(p is weight for p in group["params"])

    def module_groups(self) -> dict[str, dict]:
        """{module name: its optimizer group} for every weight module that has a group of its own; an error when a
        tuned module shares its group with another tuned module or is split over groups."""
        tuned = set(getattr(self.rule, "modules", ()))
        found: dict[str, dict] = {}
        holders: dict[str, list[int]] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            covered = self._group_modules(group)
            for module in covered:
                holders.setdefault(module, []).append(i)
                if module in tuned and not self._holds_weight(group, module):
                    raise WeightDecayError(self._advice(f"optimizer group {group.get('name', i)!r} is named after "
                                                        f"the tuned module {module!r} but does not hold its weight"))
            if len(covered & tuned) > 1:
                both = sorted(covered & tuned)
                raise WeightDecayError(self._advice(f"optimizer group {group.get('name', i)!r} holds {len(both)} "
                                                    f"tuned modules ({', '.join(both[:3])}"
                                                    f"{', ...' if len(both) > 3 else ''}), which need different "
                                                    "decays"))
            if len(covered) == 1:
                found[next(iter(covered))] = group
        for module in sorted(tuned):
            params = {id(p) for p in self.modules[module].parameters(recurse=False)}
            places = [i for i, g in enumerate(self.optimizer.param_groups) if params & {id(p) for p in g["params"]}]
            if module not in found or len(places) > 1:
                where = "no optimizer group" if not places else f"optimizer groups {places}"
                raise WeightDecayError(self._advice(f"the tuned module {module!r} is in {where}"))
        return found

    def _advice(self, problem: str) -> str:
        return (f"weight-decay method {self.name!r}: {problem}. A module-wise method sets one decay per module, so "
                "each tuned module needs an optimizer group of its own holding its weight and bias: build the groups "
                "with alphadecay.wd.module_param_groups(model, weight_decay) (or leave the module out with the "
                "'exclude' option).")

    # -- the scheduler interface -----------------------------------------------------------------------------
    def step(self) -> dict[str, float] | None:
        """Once per optimizer update, after backward() (and clipping), before optimizer.step(): the rule's decays
        for this update, applied to the optimizer; returns the metrics to log, or None when nothing changed."""
        update = self.rule.step(self.update, self.model)
        self.update += 1
        if update is None:
            return None
        metrics = dict(update.metrics)
        if update.every_group is not None:
            for group in self.optimizer.param_groups:
                _set(group, update.every_group)
        if update.modules:
            groups = self.module_groups()
            for module, multiplier in update.modules.items():
                _set(groups[module], multiplier)
            metrics.update(self._decay_metrics(groups, update.modules))
        return metrics

    def skip(self) -> None:
        """An update the training loop dropped (its gradients were not finite): counted, nothing computed, so
        the passes stay at their update numbers."""
        self.update += 1

    def _decay_metrics(self, groups: dict[str, dict], changed: dict[str, float]) -> dict[str, float]:
        """wd/<module> for every module set, the per-type mean decays, and the parameter-weighted mean multiplier."""
        out = {f"wd/{m}": groups[m]["weight_decay"] for m in changed}
        kinds: dict[str, list[float]] = {}
        for m in changed:
            kinds.setdefault(module_kind(m), []).append(groups[m]["weight_decay"])
        for kind, key in TYPE_KEYS.items():
            if kind in kinds:
                out[f"wd_{key}"] = float(np.mean(kinds[kind]))
        sizes = [sum(p.numel() for p in g["params"]) for g in self.optimizer.param_groups]
        total = sum(sizes)
        out["wd_multiplier_mean"] = sum(n * g["wd_multiplier"] for n, g in
                                        zip(sizes, self.optimizer.param_groups)) / max(1, total)
        return out

    def last_weight_decays(self) -> dict[str, float]:
        """{module name: its group's current decay} for every weight module that has a group of its own."""
        return {module: group["weight_decay"] for module, group in self.module_groups().items()}

    def state_dict(self) -> dict:
        return {"method": self.name, "update": self.update, "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method", self.name) != self.name:
            raise WeightDecayError(f"the scheduler state is method {state['method']!r}'s, not {self.name!r}'s.")
        self.update = int(state["update"])
        self.rule.load_state_dict(state["rule"])

    def __repr__(self) -> str:
        return f"Scheduler({self.name!r}, update={self.update}, tuned modules={len(getattr(self.rule, 'modules', ()))})"


def _set(group: dict, multiplier: float) -> None:
    group["wd_multiplier"] = float(multiplier)
    group["weight_decay"] = group["base_weight_decay"] * float(multiplier)


def legacy_state(state: dict, update: int) -> dict:
    """A checkpoint's scheduler state in this format: checkpoints written before the library hold the rule's state
    alone, and the trainer's update count is the scheduler's."""
    return state if "rule" in state else {"update": update, "rule": state}


def create(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Scheduler:
    """The weight-decay scheduler `name` (alphadecay.wd.available()) for `model` and `optimizer`; options are the
    method's keyword arguments (registry.OPTIONS), with the paper's defaults."""
    entry = method(name)
    resolved = resolve_options(name, options)
    model = unwrap(model)
    if not weight_modules(model):
        raise WeightDecayError(f"weight-decay method {name!r}: the model ({type(model).__name__}) has no nn.Linear, "
                               "nn.Conv2d or Hugging Face Conv1D module, which is what the methods decay per module; "
                               "pass the model itself (not a loss function or a container of its outputs).")
    module_name, function = entry.builder.split(":")
    rule = getattr(importlib.import_module(module_name), function)(model, optimizer, resolved)
    return Scheduler(name, rule, model, optimizer)


def from_flags(config: Any, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Scheduler:
    """The scheduler a training configuration selects (its `wd_method()`: --wd_scheduler, or the official flags),
    with the options its official flags give (registry.options_from_flags). `options` add to them where the method
    takes them (a model family's timing, given whatever the method). Both trainers build theirs here."""
    name = config.wd_method()
    extra = {key: value for key, value in options.items() if key in method(name).options}
    return create(name, model, optimizer, **{**options_from_flags(config, name), **extra})
