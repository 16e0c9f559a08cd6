"""Module-wise weight decay: AlphaDecay (He et al. 2025) and, with other settings, the paper's AdaDecay.

LLaMA timing: at update 0 and whenever (update + 1) % every == 0 (official torchrun_main.py:421-424), after
the gradients are reduced and before the optimizer step:
  1. a score per tuned Linear module: a spectral metric of its weight (alpha by default: the Hill exponent of the
     ESD, `alphadecay.esd`, computed once and shared out across ranks; on FSDP's row-sharded weights without
     gathering them everywhere, `alphadecay.esd.sharded`) or its gradient norm (no eigenvalues);
  2. a map from scores to decay multipliers (`alphadecay.assign`; tb_linear_map onto [wd_min_ratio, wd_max_ratio]
     for AlphaDecay: a heavier tail, i.e. a smaller alpha, gets less decay);
  3. the multipliers are broadcast from rank 0, so every replica applies the same decays.
Modules tied to another module's parameter (GPT-2's lm_head, which is the token embedding) are never tuned.

Which modules are tuned (official WeightDecayUnbalance.py:76-86): every nn.Linear, nn.Conv2d and Conv1D in module order,
minus the first (LLaMA: layer-0 q_proj; ViT: the patch Conv2d; --remove_first_layer) and the last (lm_head / head,
--remove_last_layer), minus --wd_exclude matches, minus (for spectral metrics; on the ViT always) matrices with
fewer than 50 eigenvalues: 7L - 1 modules for LLaMA, 4 per block for the ViT (48 on DeiT-tiny). A Conv2d's
spectrum is that of its weight as an (out, in * kh * kw) matrix (`groups.module_matrix`; a Conv1D's is its weight transposed). Untuned modules, the
embeddings and the norms keep their base decay.

When the passes run differs between the authors' two codebases (the `timing` option): 'llama' as above; 'vit' at
the first update of every epoch, on that update's gradient, with `every` ignored (official ViT engine.py:57,
96-100), and matrices with fewer than 50 eigenvalues dropped whatever the metric. (The official ViT code also runs a
pass at initialisation, but the epoch-0 pass overwrites its decays before the first optimizer step, on the same
weights: it changes nothing.)

Update 0 reproduces the official pass at initialisation, which runs before any gradient exists: the weights are
the initial ones, and the gradient norm of every module is the official placeholder 10, so every z-score is 0
and AdaDecay starts at the base decay, as the method intends. The official code does not: its placeholder is
the integer 10, so the score column is int64, `np.zeros_like` makes layerwise_sigmoid's decays an integer array,
and 1.0 × wd is truncated to 0 (WeightDecayUnbalance.py:234, :344, :358): every tuned module trains with decay 0
until the first in-loop pass (update 499 by default). `official_adadecay_init=True` (--official_adadecay_init)
reproduces that.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from alphadecay import dist, esd
from alphadecay.esd.sharded import module_metrics
from alphadecay.wd.assign import assign
from alphadecay.wd.groups import layer_index, module_kind, module_matrix, tied_modules, weight_modules
from alphadecay.wd.norms import tensor_norms
from alphadecay.wd.registry import WeightDecayError
from alphadecay.wd.scheduler import TYPE_KEYS, WDUpdate

GRADNORM_AT_INIT = 10.0  # the official placeholder when a module has no gradient yet
SPECTRAL_METRICS = {"alpha", "alphahat", "spectral_norm", "stable_rank", "entropy", "fnorm", "gradnorm_d_weightnorm"}
GRADIENT_METRICS = {"gradnorm", "gradnorm_d_weightnorm"}


def tuned_modules(model: nn.Module, *, remove_first: bool, remove_last: bool, exclude: list[str] | tuple = (),
                  min_eigs: int = 0) -> list[str]:
    """Names of the weight modules whose decay the scheduler sets, in module order: the first and last in module
    order removed (before anything else, as the official code), then tied modules, `exclude` matches and matrices
    with fewer than `min_eigs` eigenvalues."""
    names = [(name, min(module_matrix(m).shape)) for name, m in weight_modules(model)]
    if remove_first:
        names = names[1:]
    if remove_last:
        names = names[:-1]
    tied = tied_modules(model)
    return [n for n, size in names
            if size >= min_eigs and n not in tied and not any(re.search(p, n) for p in exclude)]


class ModulewiseDecay:
    def __init__(self, model: nn.Module, *, metric: str = "alpha", assign: str = "tb_linear_map", every: int = 500,
                 min_ratio: float = 0.6666, max_ratio: float = 3.0, fit: str = "median", xmin_pos: float = 2.0,
                 filter_zeros: bool = False, official_fix_finger: bool = False, remove_first: bool = True,
                 remove_last: bool = True, exclude: list[str] | tuple = (), apply_mapping: bool = True,
                 sigmoid_slope: float = 4.0, eigs_thresh: int = 50, estimator: str = "full",
                 farms: esd.FarmsSampling = esd.FarmsSampling(), official_adadecay_init: bool = False,
                 timing: str = "llama", updates_per_epoch: int | None = None):
        check_options(every=every, timing=timing, updates_per_epoch=updates_per_epoch, exclude=exclude)
        self.metric, self.assign_func, self.every = metric, assign, every
        self.timing, self.updates_per_epoch = timing, updates_per_epoch
        # the official integer placeholder's effect (module docstring): only through layerwise_sigmoid's zeros_like
        self.zero_at_init = official_adadecay_init and assign == "layerwise_sigmoid" and metric in GRADIENT_METRICS
        self.min_ratio, self.max_ratio, self.sigmoid_slope = min_ratio, max_ratio, sigmoid_slope
        self.fit_kwargs = {"fit": fit, "xmin_pos": xmin_pos, "filter_zeros": filter_zeros,
                           "official_fix_finger": official_fix_finger, "eigs_thresh": eigs_thresh,
                           "estimator": estimator, "farms": farms}
        self.apply_mapping = apply_mapping
        self.needs_eigs = metric in SPECTRAL_METRICS
        filter_eigs = self.needs_eigs or timing == "vit"  # the ViT code filters whatever the metric
        self.modules = tuned_modules(model, remove_first=remove_first, remove_last=remove_last, exclude=exclude,
                                     min_eigs=eigs_thresh if filter_eigs else 0)
        self.blocks = [layer_index(n) if layer_index(n) is not None else n for n in self.modules]
        self.kinds = [module_kind(n) for n in self.modules]
        self.last_multipliers: dict[str, float] = {}

    def due(self, step: int) -> bool:
        if self.timing == "vit":  # the first update of every epoch
            return step % self.updates_per_epoch == 0
        return step == 0 or (step + 1) % self.every == 0

    def initial(self, step: int) -> bool:
        """Whether this pass stands for the official one at initialisation, before any gradient exists (LLaMA's
        update 0); the ViT's passes all run after a backward pass."""
        return self.timing == "llama" and step == 0

    # -- scores ----------------------------------------------------------------------------------------------
    def gradient_norms(self, model: nn.Module, initial: bool) -> np.ndarray:
        if initial:
            return np.full(len(self.modules), GRADNORM_AT_INIT)
        modules = dict(weight_modules(model))
        grads = [modules[n].weight.grad for n in self.modules]
        present = [g for g in grads if g is not None]
        if not present:
            raise WeightDecayError(
                f"metric {self.metric!r} reads the gradients, but no tuned module has one: call the scheduler's "
                "step() after loss.backward() (and clipping) and before optimizer.step() / zero_grad(), once per "
                "optimizer update.")
        norms = iter(tensor_norms(present).cpu().tolist())  # DTensor shards too: one all-reduce
        return np.array([next(norms) if g is not None else GRADNORM_AT_INIT for g in grads])

    def scores(self, model: nn.Module, initial: bool) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
        """The driving metric per tuned module, and every spectral statistic computed on the way."""
        stats: dict[str, dict[str, float]] = {}
        if self.needs_eigs:
            modules = dict(weight_modules(model))
            stats = module_metrics([(n, module_matrix(modules[n]).detach()) for n in self.modules],
                                   **self.fit_kwargs)  # esd.module_metrics, or its sharded route for DTensors
        if self.metric == "gradnorm":
            return self.gradient_norms(model, initial), stats
        if self.metric == "gradnorm_d_weightnorm":
            grads = self.gradient_norms(model, initial)
            if initial:
                return grads, stats  # the official code uses the placeholder 10 for both
            return np.array([g / (stats[n]["spectral_norm"] + 1e-8) for g, n in zip(grads, self.modules)]), stats
        return np.array([stats[n][self.metric] for n in self.modules], dtype=np.float64), stats

    # -- the rule interface ----------------------------------------------------------------------------------
    def step(self, step: int, model: nn.Module) -> WDUpdate | None:
        if not self.due(step) or not self.modules:
            return None
        scores, stats = self.scores(model, initial=self.initial(step))
        if self.apply_mapping and self.initial(step) and self.zero_at_init:
            multipliers = np.zeros(len(self.modules))  # official_adadecay_init: the official int64 decays
        elif self.apply_mapping:
            multipliers = assign(self.assign_func, scores, blocks=self.blocks, min_ratio=self.min_ratio,
                                 max_ratio=self.max_ratio, slope=self.sigmoid_slope)
        else:  # apply_mapping False (--use_modulewise_wd without --alpha_positively_with_WD): measure and log only
            multipliers = np.ones(len(self.modules))
        shared = dist.broadcast_tensor(torch.tensor(multipliers, dtype=torch.float64, device=_device(model)))
        self.last_multipliers = dict(zip(self.modules, shared.cpu().tolist()))
        return WDUpdate(self.last_multipliers, self.summary(scores, stats))

    def summary(self, scores: np.ndarray, stats: dict[str, dict[str, float]]) -> dict[str, float]:
        """Per-module metric (and alpha), per-type mean alphas, the pass's counts; the scheduler adds the decays."""
        out: dict[str, float] = {}
        for name, score in zip(self.modules, scores):
            out[f"{self.metric}/{name}"] = float(score)
            if self.metric != "alpha" and name in stats:
                out[f"alpha/{name}"] = stats[name]["alpha"]
        for kind, key in TYPE_KEYS.items():
            idx = [i for i, k in enumerate(self.kinds) if k == kind]
            if idx and stats:
                out[f"alpha_{key}"] = float(np.nanmean([stats[self.modules[i]]["alpha"] for i in idx]))
        out["wd_tuned_modules"] = float(len(self.modules))
        out["wd_invalid_fits"] = float(np.sum(~np.isfinite(scores)))
        return out

    def state_dict(self) -> dict:
        return {"last_multipliers": dict(self.last_multipliers)}

    def load_state_dict(self, state: dict) -> None:
        self.last_multipliers = dict(state.get("last_multipliers", {}))


def _device(model: nn.Module) -> torch.device:
    # NCCL broadcasts CUDA tensors only; gloo takes CPU tensors.
    return next(model.parameters()).device


def check_options(*, every: int, timing: str, updates_per_epoch: int | None, exclude) -> None:
    """The module-wise options' values that the registry's choices do not cover, each an error naming the option."""
    if not isinstance(every, int) or every < 1:
        raise WeightDecayError(f"option every={every!r}: a pass every this many updates, a positive integer.")
    if timing == "vit" and not (isinstance(updates_per_epoch, int) and updates_per_epoch >= 1):
        raise WeightDecayError("option timing='vit' runs a pass at the first update of every epoch: give "
                               f"updates_per_epoch (a positive integer), got {updates_per_epoch!r}.")
    if isinstance(exclude, str):
        raise WeightDecayError(f"option exclude={exclude!r}: a list of regular expressions, e.g. [{exclude!r}].")
    for pattern in exclude:
        try:
            re.compile(pattern)
        except re.error as err:
            raise WeightDecayError(f"option exclude: {pattern!r} is not a regular expression: {err}.") from None


def from_options(model: nn.Module, options: dict) -> ModulewiseDecay:
    """A ModulewiseDecay from the registry's option names (alphadecay/wd/registry.py OPTIONS)."""
    opts = dict(options)
    farms = esd.FarmsSampling(opts.pop("farms_window"), opts.pop("farms_aspect_ratio"),
                              opts.pop("farms_windows_per_dim"), opts.pop("farms_min_step"))
    return ModulewiseDecay(model, farms=farms, **opts)


def build(model: nn.Module, optimizer, options: dict) -> ModulewiseDecay:
    """alphadecay (or the official --use_modulewise_wd with a spectral metric)."""
    return from_options(model, options)
