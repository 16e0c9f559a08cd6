"""Module-wise weight decay: AlphaDecay (He et al. 2025) and, with other settings, the paper's AdaDecay.

At update 0 and whenever (update + 1) % --unbalancedWD_every == 0 (official torchrun_main.py:421-424), after
the gradients are reduced and before the optimizer step:
  1. a score per tuned Linear module: a spectral metric of its weight (alpha by default: the Hill exponent of the
     ESD, `alphadecay.esd`, computed once and shared out across ranks) or its gradient norm (no eigenvalues);
  2. a map from scores to decay multipliers (`alphadecay.assign`; tb_linear_map onto [wd_min_ratio, wd_max_ratio]
     for AlphaDecay: a heavier tail, i.e. a smaller alpha, gets less decay);
  3. the multipliers are broadcast from rank 0, so every replica applies the same decays.

Which modules are tuned (official WeightDecayUnbalance.py:76-86): every nn.Linear in module order, minus the first
(layer-0 q_proj, --remove_first_layer) and the last (lm_head, --remove_last_layer), minus --wd_exclude matches,
minus (for spectral metrics) matrices with fewer than 50 eigenvalues. Untuned modules, the embedding and the
norms keep their base decay.

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
from alphadecay.assign import assign
from alphadecay.config import TrainConfig
from alphadecay.param_groups import linear_modules
from alphadecay.schedulers import WDUpdate

GRADNORM_AT_INIT = 10.0  # the official placeholder when a module has no gradient yet
SPECTRAL_METRICS = {"alpha", "alphahat", "spectral_norm", "stable_rank", "entropy", "fnorm", "gradnorm_d_weightnorm"}
# the paper's per-type summaries, under the official wandb key names (torchrun_main.py:504-514)
TYPE_KEYS = {"q": "Q", "k": "K", "v": "V", "o": "O", "gate": "MLPgate", "up": "MLPup", "down": "MLPdown"}


def tuned_modules(model: nn.Module, *, remove_first: bool, remove_last: bool, exclude: list[str],
                  min_eigs: int = 0) -> list[str]:
    """Names of the Linear modules whose decay the scheduler sets, in module order."""
    names = [(name, min(m.weight.shape)) for name, m in linear_modules(model)]
    if remove_first:
        names = names[1:]
    if remove_last:
        names = names[:-1]
    return [n for n, size in names if size >= min_eigs and not any(re.search(p, n) for p in exclude)]


class ModulewiseDecay:
    def __init__(self, model: nn.Module, param_groups: list[dict], *, metric: str, assign_func: str, every: int,
                 min_ratio: float, max_ratio: float, fit: str = "median", xmin_pos: float = 2.0,
                 filter_zeros: bool = False, official_fix_finger: bool = False, remove_first: bool = True,
                 remove_last: bool = True, exclude: list[str] | None = None, apply_mapping: bool = True,
                 sigmoid_slope: float = 4.0, eigs_thresh: int = 50, estimator: str = "full",
                 farms: esd.FarmsSampling = esd.FarmsSampling(), official_adadecay_init: bool = False):
        self.metric, self.assign_func, self.every = metric, assign_func, every
        # the official integer placeholder's effect (module docstring): only through layerwise_sigmoid's zeros_like
        self.zero_at_init = (official_adadecay_init and assign_func == "layerwise_sigmoid"
                             and metric in ("gradnorm", "gradnorm_d_weightnorm"))
        self.min_ratio, self.max_ratio, self.sigmoid_slope = min_ratio, max_ratio, sigmoid_slope
        self.fit_kwargs = {"fit": fit, "xmin_pos": xmin_pos, "filter_zeros": filter_zeros,
                           "official_fix_finger": official_fix_finger, "eigs_thresh": eigs_thresh,
                           "estimator": estimator, "farms": farms}
        self.apply_mapping = apply_mapping
        self.needs_eigs = metric in SPECTRAL_METRICS
        self.modules = tuned_modules(model, remove_first=remove_first, remove_last=remove_last, exclude=exclude or [],
                                     min_eigs=eigs_thresh if self.needs_eigs else 0)
        groups = {g["name"]: g for g in param_groups}
        missing = [n for n in self.modules if n not in groups]
        if missing:
            raise ValueError(f"tuned modules without a parameter group of the same name: {missing}")
        self.blocks = [groups[n]["layer"] if groups[n]["layer"] is not None else n for n in self.modules]
        self.kinds = [groups[n]["kind"] for n in self.modules]
        self.base = {n: groups[n]["base_weight_decay"] for n in self.modules}
        self.sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in param_groups}
        self.last_multipliers: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: TrainConfig, model: nn.Module, param_groups: list[dict]) -> ModulewiseDecay:
        return cls(model, param_groups, metric=config.esd_metric_for_tb, assign_func=config.assign_func,
                   every=config.unbalancedWD_every, min_ratio=config.wd_min_ratio, max_ratio=config.wd_max_ratio,
                   fit=config.pl_fitting, xmin_pos=config.xmin_pos, filter_zeros=config.filter_zeros,
                   official_fix_finger=config.official_fix_finger, remove_first=config.remove_first_layer,
                   remove_last=config.remove_last_layer, exclude=config.wd_exclude,
                   apply_mapping=config.alpha_positively_with_WD, estimator=config.esd_estimator,
                   farms=esd.FarmsSampling(config.farms_window, config.farms_aspect_ratio,
                                           config.farms_windows_per_dim),
                   official_adadecay_init=config.official_adadecay_init)

    def due(self, step: int) -> bool:
        return step == 0 or (step + 1) % self.every == 0

    # -- scores ----------------------------------------------------------------------------------------------
    def gradient_norms(self, model: nn.Module, initial: bool) -> np.ndarray:
        if initial:
            return np.full(len(self.modules), GRADNORM_AT_INIT)
        modules = dict(linear_modules(model))
        grads = [modules[n].weight.grad for n in self.modules]
        present = [g for g in grads if g is not None]
        norms = iter(torch.stack(torch._foreach_norm(present)).double().cpu().tolist()) if present else iter(())
        return np.array([next(norms) if g is not None else GRADNORM_AT_INIT for g in grads])

    def scores(self, model: nn.Module, initial: bool) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
        """The driving metric per tuned module, and every spectral statistic computed on the way."""
        stats: dict[str, dict[str, float]] = {}
        if self.needs_eigs:
            modules = dict(linear_modules(model))
            stats = esd.module_metrics([(n, modules[n].weight.detach()) for n in self.modules], **self.fit_kwargs)
        if self.metric == "gradnorm":
            return self.gradient_norms(model, initial), stats
        if self.metric == "gradnorm_d_weightnorm":
            grads = self.gradient_norms(model, initial)
            if initial:
                return grads, stats  # the official code uses the placeholder 10 for both
            return np.array([g / (stats[n]["spectral_norm"] + 1e-8) for g, n in zip(grads, self.modules)]), stats
        return np.array([stats[n][self.metric] for n in self.modules], dtype=np.float64), stats

    # -- the scheduler interface -----------------------------------------------------------------------------
    def step(self, step: int, model: nn.Module) -> WDUpdate | None:
        if not self.due(step) or not self.modules:
            return None
        scores, stats = self.scores(model, initial=step == 0)
        if self.apply_mapping and step == 0 and self.zero_at_init:
            multipliers = np.zeros(len(self.modules))  # --official_adadecay_init: the official int64 decays
        elif self.apply_mapping:
            multipliers = assign(self.assign_func, scores, blocks=self.blocks, min_ratio=self.min_ratio,
                                 max_ratio=self.max_ratio, slope=self.sigmoid_slope)
        else:  # --use_modulewise_wd without --alpha_positively_with_WD: measure and log only (ViT semantics)
            multipliers = np.ones(len(self.modules))
        shared = dist.broadcast_tensor(torch.tensor(multipliers, dtype=torch.float64, device=self._device(model)))
        self.last_multipliers = dict(zip(self.modules, shared.cpu().tolist()))
        return WDUpdate(self.last_multipliers, self.summary(scores, stats))

    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        # NCCL broadcasts CUDA tensors only; gloo takes CPU tensors.
        return next(model.parameters()).device

    def summary(self, scores: np.ndarray, stats: dict[str, dict[str, float]]) -> dict[str, float]:
        """Per-module metric and decay, per-type means, and the parameter-weighted mean multiplier."""
        out: dict[str, float] = {}
        for name, score in zip(self.modules, scores):
            out[f"{self.metric}/{name}"] = float(score)
            if self.metric != "alpha" and name in stats:
                out[f"alpha/{name}"] = stats[name]["alpha"]
            out[f"wd/{name}"] = self.base[name] * self.last_multipliers[name]
        for kind, key in TYPE_KEYS.items():
            idx = [i for i, k in enumerate(self.kinds) if k == kind]
            if idx and stats:
                out[f"alpha_{key}"] = float(np.nanmean([stats[self.modules[i]]["alpha"] for i in idx]))
            if idx:
                out[f"wd_{key}"] = float(np.mean([self.base[self.modules[i]] * self.last_multipliers[self.modules[i]]
                                                  for i in idx]))
        total = sum(self.sizes.values())
        untuned = total - sum(self.sizes[n] for n in self.modules)
        out["wd_multiplier_mean"] = (untuned + sum(self.sizes[n] * m for n, m in self.last_multipliers.items())) / total
        out["wd_tuned_modules"] = float(len(self.modules))
        out["wd_invalid_fits"] = float(np.sum(~np.isfinite(scores)))
        return out

    def state_dict(self) -> dict:
        return {"last_multipliers": dict(self.last_multipliers)}

    def load_state_dict(self, state: dict) -> None:
        self.last_multipliers = dict(state.get("last_multipliers", {}))
