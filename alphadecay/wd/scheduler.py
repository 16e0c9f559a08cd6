"""The object `alphadecay.wd.create` returns: a method's rule bound to a model and an optimizer.

    scheduler = alphadecay.wd.create("alphadecay", model, optimizer, every=500)
    ...
    loss.backward()                      # (and clipping)
    metrics = scheduler.step()           # once per optimizer update, before optimizer.step()
    optimizer.step()

`step()` counts the updates itself and asks the rule (alphadecay/wd/registry.py), or the two rules of a
combination such as `alphadecay+cautious`, for this update's decays. A group's decay is

    effective_weight_decay = base_weight_decay x wd_multiplier x wd_scale

`wd_multiplier` is what a multipliers method sets (per module, or one for every group; it stays until changed) and
`wd_scale` what a form sets for this update (AdamC's lr_t / lr_max, independent decay's 1 / lr_max, SWD's
1 / sqrt(v_bar)); both start at 1. torch applies it as the group's `weight_decay`, except when a rule applies the
decay itself (`apply_decay`: cautious decay's per-element mask): then `weight_decay` is 0 and the rule decays the
parameters before optimizer.step(). These keys are the group's, so they travel in the optimizer's state_dict.
`step()` returns what to log — the rules' metrics plus `wd/<module>` (base x multiplier) for every module whose
multiplier it set, the per-type means and the parameter-weighted mean multiplier — or None when nothing changed.

Decays reach the optimizer by name, never by position. A tuned module's group is found, at every change (torch's
`Optimizer.load_state_dict` replaces the group dicts), by the group's `"name"` (module_param_groups sets it),
else torch's `"param_names"` (an optimizer built from `named_parameters()`), else by the identity of the module's
weight among the group's parameters. Each tuned module must have its own group: one that holds its weight and
bias and no other tuned module. A group's base decay is its `base_weight_decay` key, which the scheduler sets from
the group's `weight_decay` the first time it sees a group without one. A form's `scales` are one per group in the
order of `optimizer.param_groups` at that step() (the rule reads the groups in the same call).

The forms are defined for decoupled decay: they need torch's AdamW (or Adam with decoupled_weight_decay=True), whose
state (`exp_avg`, `exp_avg_sq`, `step`) cautious decay and SWD read (`adam_moments`), and whose groups' `lr` and
`initial_lr` AdamC and independent decay read (`peak_lrs`).

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
from alphadecay.wd.registry import WeightDecayError, method, options_from_flags, parts, resolve_options, uses_form

# the paper's per-type summaries, under the official wandb key names (torchrun_main.py:504-514), then the ViT's
TYPE_KEYS = {"q": "Q", "k": "K", "v": "V", "o": "O", "gate": "MLPgate", "up": "MLPup", "down": "MLPdown",
             "qkv": "QKV", "proj": "AttnProj", "fc1": "MLPfc1", "fc2": "MLPfc2"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WDUpdate:
    """What a rule's step returns: multipliers of module groups' base decays (`modules`), or of every group's
    (`every_group`); factors of each group's decay for this update (`scales`, one per optimizer group, in order);
    and scalars to log."""

    __slots__ = ("modules", "every_group", "scales", "metrics")

    def __init__(self, modules: dict[str, float] | None = None, metrics: dict[str, float] | None = None, *,
                 every_group: float | None = None, scales: list[float] | None = None):
        self.modules = dict(modules or {})
        self.every_group = every_group
        self.scales = None if scales is None else [float(s) for s in scales]
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
    def __init__(self, name: str, rules: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
        """`rules`: the method's rule, or a list of them (a combination: the multipliers' rule, then the form's)."""
        self.rules = list(rules) if isinstance(rules, (list, tuple)) else [rules]
        self.name, self.rule, self.model, self.optimizer = name, self.rules[0], model, optimizer
        self.update = 0  # step() calls completed: the next step() is optimizer update number `update`
        self.passed = False  # whether the last step() set module-wise decays (a pass: its metrics deserve a record)
        appliers = [r for r in self.rules if hasattr(r, "apply_decay")]
        if len(appliers) > 1:
            raise WeightDecayError(f"weight-decay method {name!r}: two rules apply the decay themselves.")
        self.applier = appliers[0] if appliers else None  # the rule that applies the decay itself, if any
        tied = tied_modules(model)  # a tied head is its embedding: no group of its own, never tuned
        self.modules = {n: m for n, m in weight_modules(model) if n not in tied}
        self._weight_owner = {id(m.weight): n for n, m in self.modules.items()}
        for group in optimizer.param_groups:
            group.setdefault("base_weight_decay", group["weight_decay"])
            group.setdefault("wd_multiplier", 1.0)
            group.setdefault("wd_scale", 1.0)
            group.setdefault("effective_weight_decay", group["weight_decay"])  # every key from the start: DCP
            # loads an optimizer state only into groups that already have its keys
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
        tuned = {m for rule in self.rules for m in getattr(rule, "modules", ())}
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
        """Once per optimizer update, after backward() (and clipping), before optimizer.step(): the rules' decays
        for this update, applied to the optimizer (by a rule that applies the decay itself, to the parameters);
        returns the metrics to log, or None when nothing changed."""
        groups = self.optimizer.param_groups
        updates = [u for u in (rule.step(self.update, self.model) for rule in self.rules) if u is not None]
        self.update += 1
        self.passed = any(u.modules for u in updates)
        if not updates and self.applier is None:
            return None
        metrics: dict[str, float] = {}
        changed: dict[str, float] = {}
        for update in updates:
            metrics.update(update.metrics)
            if update.every_group is not None:
                for group in groups:
                    group["wd_multiplier"] = float(update.every_group)
            if update.modules:
                by_module = self.module_groups()
                for module, multiplier in update.modules.items():
                    by_module[module]["wd_multiplier"] = float(multiplier)
                changed.update(update.modules)
            if update.scales is not None:
                if len(update.scales) != len(groups):
                    raise WeightDecayError(f"weight-decay method {self.name!r}: its rule gave {len(update.scales)} "
                                           f"scales for {len(groups)} optimizer groups.")
                for group, scale in zip(groups, update.scales):
                    group["wd_scale"] = scale
        for group in groups:
            group["effective_weight_decay"] = (group["base_weight_decay"] * group["wd_multiplier"]
                                               * group.get("wd_scale", 1.0))
            group["weight_decay"] = 0.0 if self.applier is not None else group["effective_weight_decay"]
        if changed:
            metrics.update(self._decay_metrics(self.module_groups(), changed))
        if self.applier is not None:
            metrics.update(self.applier.apply_decay(groups) or {})
        return metrics

    def skip(self) -> None:
        """An update the training loop dropped (its gradients were not finite): counted, nothing computed, so
        the passes stay at their update numbers."""
        self.update += 1
        self.passed = False

    def _decay_metrics(self, groups: dict[str, dict], changed: dict[str, float]) -> dict[str, float]:
        """wd/<module> (its module-wise decay, base x multiplier, before a form's factor for the update) for every
        module set, the per-type mean decays, and the parameter-weighted mean multiplier."""
        out = {f"wd/{m}": modulewise_decay(groups[m]) for m in changed}
        kinds: dict[str, list[float]] = {}
        for m in changed:
            kinds.setdefault(module_kind(m), []).append(modulewise_decay(groups[m]))
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
        return {module: decay_of(group) for module, group in self.module_groups().items()}

    def state_dict(self) -> dict:
        state = {"method": self.name, "update": self.update, "rule": self.rule.state_dict()}
        if len(self.rules) > 1:
            state["form"] = self.rules[1].state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("method", self.name) != self.name:
            raise WeightDecayError(f"the scheduler state is method {state['method']!r}'s, not {self.name!r}'s.")
        self.update = int(state["update"])
        self.rule.load_state_dict(state["rule"])
        if len(self.rules) > 1:
            self.rules[1].load_state_dict(state["form"])

    def __repr__(self) -> str:
        return f"Scheduler({self.name!r}, update={self.update}, tuned modules={len(getattr(self.rule, 'modules', ()))})"


def modulewise_decay(group: dict) -> float:
    return group["base_weight_decay"] * group["wd_multiplier"]


def decay_of(group: dict) -> float:
    """The decay a group gets at this update: torch's `weight_decay`, or the one a rule applies itself."""
    return group.get("effective_weight_decay", group["weight_decay"])


# -- for rules that read the optimizer (the forms) -------------------------------------------------------------------
def decoupled_adam(optimizer: Any, name: str) -> torch.optim.Adam:
    """The torch AdamW (or Adam with decoupled_weight_decay=True) inside `optimizer` (accelerate's wrapper keeps it
    as `.optimizer`); an error naming the problem for any other optimizer or a coupled (L2) group."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Adam):
        raise WeightDecayError(f"weight-decay method {name!r} is defined for decoupled weight decay with Adam's "
                               f"moments: it needs torch.optim.AdamW, not {type(inner).__name__}.")
    coupled = [g.get("name", i) for i, g in enumerate(inner.param_groups)
               if not g.get("decoupled_weight_decay", isinstance(inner, torch.optim.AdamW))]
    if coupled:
        raise WeightDecayError(f"weight-decay method {name!r} is defined for decoupled weight decay (AdamW: "
                               "p <- p - lr x wd x p), but torch Adam's weight_decay is coupled L2 (wd x p added to "
                               "the gradient) in optimizer group(s) "
                               f"{', '.join(map(str, coupled[:3]))}: use torch.optim.AdamW (--optimizer adamw).")
    return inner


def peak_lrs(groups: list[dict], peak_lr: float | None, name: str) -> list[float]:
    """Each group's peak learning rate lr_max: `peak_lr` (x the group's lr_scale, which the layerwise scaling rules
    set), else the group's `initial_lr` (torch's LR schedulers set it); an error when neither exists."""
    if peak_lr is not None:
        return [peak_lr * g.get("lr_scale", 1.0) for g in groups]
    missing = [g.get("name", i) for i, g in enumerate(groups) if "initial_lr" not in g]
    if missing:
        raise WeightDecayError(f"weight-decay method {name!r} divides by the peak learning rate lr_max, but it was "
                               "not given (option peak_lr) and optimizer group(s) "
                               f"{', '.join(map(str, missing[:3]))} have no initial_lr (which torch's LR schedulers "
                               "set): pass peak_lr=..., or create the LR scheduler before the first step().")
    return [float(g["initial_lr"]) for g in groups]


def adam_moments(optimizer: torch.optim.Adam, group: dict) -> tuple[list, list, list, list, list]:
    """The parameters of `group` that have a gradient (those torch's step updates), split by whether Adam has state
    for them yet: (params with state, their grads, their states, params without, their grads)."""
    with_state, grads, states, fresh, fresh_grads = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        state = optimizer.state.get(p)
        if state and "exp_avg" in state:
            with_state.append(p)
            grads.append(p.grad)
            states.append(state)
        else:
            fresh.append(p)
            fresh_grads.append(p.grad)
    return with_state, grads, states, fresh, fresh_grads


def legacy_state(state: dict, update: int) -> dict:
    """A checkpoint's scheduler state in this format: checkpoints written before the library hold the rule's state
    alone, and the trainer's update count is the scheduler's."""
    return state if "rule" in state else {"update": update, "rule": state}


def create(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Scheduler:
    """The weight-decay scheduler `name` (alphadecay.wd.available()) for `model` and `optimizer`; options are the
    method's keyword arguments (registry.OPTIONS), with the paper's defaults."""
    resolved = resolve_options(name, options)
    model = unwrap(model)
    if not weight_modules(model):
        raise WeightDecayError(f"weight-decay method {name!r}: the model ({type(model).__name__}) has no nn.Linear, "
                               "nn.Conv2d or Hugging Face Conv1D module, which is what the methods decay per module; "
                               "pass the model itself (not a loss function or a container of its outputs).")
    if uses_form(name):
        decoupled_adam(optimizer, name)
    rules = []
    for part in parts(name):  # one, or a combination's multipliers method then its form
        entry = method(part)
        module_name, function = entry.builder.split(":")
        rules.append(getattr(importlib.import_module(module_name), function)(
            model, optimizer, {key: resolved[key] for key in entry.options}))
    return Scheduler(name, rules, model, optimizer)


def from_flags(config: Any, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Scheduler:
    """The scheduler a training configuration selects (its `wd_method()`: --wd_scheduler, or the official flags),
    with the options its official flags give (registry.options_from_flags). `options` add to them where the method
    takes them (a model family's timing, given whatever the method). Both trainers build theirs here."""
    name = config.wd_method()
    extra = {key: value for key, value in options.items() if key in method(name).options}
    return create(name, model, optimizer, **{**options_from_flags(config, name), **extra})
