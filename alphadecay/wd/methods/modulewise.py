"""Module-wise weight decay: AlphaDecay (He et al. 2025) and, with other settings, the paper's AdaDecay.

LLaMA: at update 0 and whenever (update + 1) % --unbalancedWD_every == 0 (official torchrun_main.py:421-424), after
the gradients are reduced and before the optimizer step:
  1. a score per tuned Linear module: a spectral metric of its weight (alpha by default: the Hill exponent of the
     ESD, `alphadecay.esd`, computed once and shared out across ranks) or its gradient norm (no eigenvalues);
  2. a map from scores to decay multipliers (`alphadecay.assign`; tb_linear_map onto [wd_min_ratio, wd_max_ratio]
     for AlphaDecay: a heavier tail, i.e. a smaller alpha, gets less decay);
  3. the multipliers are broadcast from rank 0, so every replica applies the same decays.

Which modules are tuned (official WeightDecayUnbalance.py:76-86): every nn.Linear and nn.Conv2d in module order,
minus the first (LLaMA: layer-0 q_proj; ViT: the patch Conv2d; --remove_first_layer) and the last (lm_head / head,
--remove_last_layer), minus --wd_exclude matches, minus (for spectral metrics; on the ViT always) matrices with
fewer than 50 eigenvalues: 7L - 1 modules for LLaMA, 4 per block for the ViT (48 on DeiT-tiny). A Conv2d's
spectrum is that of its weight as an (out, in * kh * kw) matrix (`param_groups.as_matrix`). Untuned modules, the
embeddings and the norms keep their base decay.

When the passes run differs between the model families (`schedulers.Family`): LLaMA as below; the ViT at the first
update of every epoch, on that update's gradient, with --unbalancedWD_every ignored (official ViT engine.py).

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
from alphadecay.wd.assign import assign
from alphadecay.config import TrainConfig
from alphadecay.wd.groups import as_matrix, weight_modules
from alphadecay.wd.registry import LLAMA, Family, WDUpdate

GRADNORM_AT_INIT = 10.0  # the official placeholder when a module has no gradient yet
SPECTRAL_METRICS = {"alpha", "alphahat", "spectral_norm", "stable_rank", "entropy", "fnorm", "gradnorm_d_weightnorm"}
# the paper's per-type summaries, under the official wandb key names (torchrun_main.py:504-514)
TYPE_KEYS = {"q": "Q", "k": "K", "v": "V", "o": "O", "gate": "MLPgate", "up": "MLPup", "down": "MLPdown",
             "qkv": "QKV", "proj": "AttnProj", "fc1": "MLPfc1", "fc2": "MLPfc2"}  # the ViT's kinds (our names)


def tuned_modules(model: nn.Module, *, remove_first: bool, remove_last: bool, exclude: list[str],
                  min_eigs: int = 0) -> list[str]:
    """Names of the Linear and Conv2d modules whose decay the scheduler sets, in module order."""
    names = [(name, min(as_matrix(m.weight).shape)) for name, m in weight_modules(model)]
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
                 farms: esd.FarmsSampling = esd.FarmsSampling(), official_adadecay_init: bool = False,
                 family: Family = LLAMA):
        self.metric, self.assign_func, self.every, self.family = metric, assign_func, every, family
        # the official integer placeholder's effect (module docstring): only through layerwise_sigmoid's zeros_like
        self.zero_at_init = (official_adadecay_init and assign_func == "layerwise_sigmoid"
                             and metric in ("gradnorm", "gradnorm_d_weightnorm"))
        self.min_ratio, self.max_ratio, self.sigmoid_slope = min_ratio, max_ratio, sigmoid_slope
        self.fit_kwargs = {"fit": fit, "xmin_pos": xmin_pos, "filter_zeros": filter_zeros,
                           "official_fix_finger": official_fix_finger, "eigs_thresh": eigs_thresh,
                           "estimator": estimator, "farms": farms}
        self.apply_mapping = apply_mapping
        self.needs_eigs = metric in SPECTRAL_METRICS
        filter_eigs = self.needs_eigs or family.name == "vit"  # the ViT code filters whatever the metric
        self.modules = tuned_modules(model, remove_first=remove_first, remove_last=remove_last, exclude=exclude or [],
                                     min_eigs=eigs_thresh if filter_eigs else 0)
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
    def from_config(cls, config: TrainConfig, model: nn.Module, param_groups: list[dict],
                    family: Family = LLAMA) -> ModulewiseDecay:
        """From a TrainConfig or a ViTConfig (the same flag names; --official_adadecay_init is LLaMA's only)."""
        return cls(model, param_groups, family=family, metric=config.esd_metric_for_tb, assign_func=config.assign_func,
                   every=config.unbalancedWD_every, min_ratio=config.wd_min_ratio, max_ratio=config.wd_max_ratio,
                   fit=config.pl_fitting, xmin_pos=config.xmin_pos, filter_zeros=config.filter_zeros,
                   official_fix_finger=config.official_fix_finger, remove_first=config.remove_first_layer,
                   remove_last=config.remove_last_layer, exclude=config.wd_exclude,
                   apply_mapping=config.alpha_positively_with_WD, estimator=config.esd_estimator,
                   farms=esd.FarmsSampling.from_flags(config),
                   official_adadecay_init=family.name == "llama" and config.official_adadecay_init)

    def due(self, step: int) -> bool:
        if self.family.updates_per_epoch is not None:  # ViT: the first update of every epoch
            return step % self.family.updates_per_epoch == 0
        return step == 0 or (step + 1) % self.every == 0

    def initial(self, step: int) -> bool:
        """Whether this pass stands for the official one at initialisation, before any gradient exists (LLaMA's
        update 0); the ViT's passes all run after a backward pass."""
        return self.family.name == "llama" and step == 0

    # -- scores ----------------------------------------------------------------------------------------------
    def gradient_norms(self, model: nn.Module, initial: bool) -> np.ndarray:
        if initial:
            return np.full(len(self.modules), GRADNORM_AT_INIT)
        modules = dict(weight_modules(model))
        grads = [modules[n].weight.grad for n in self.modules]
        present = [g for g in grads if g is not None]
        norms = iter(torch.stack(torch._foreach_norm(present)).double().cpu().tolist()) if present else iter(())
        return np.array([next(norms) if g is not None else GRADNORM_AT_INIT for g in grads])

    def scores(self, model: nn.Module, initial: bool) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
        """The driving metric per tuned module, and every spectral statistic computed on the way."""
        stats: dict[str, dict[str, float]] = {}
        if self.needs_eigs:
            modules = dict(weight_modules(model))
            stats = esd.module_metrics([(n, as_matrix(modules[n].weight.detach())) for n in self.modules],
                                       **self.fit_kwargs)
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
        scores, stats = self.scores(model, initial=self.initial(step))
        if self.apply_mapping and self.initial(step) and self.zero_at_init:
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


def build_alphadecay(config: TrainConfig, model: nn.Module, param_groups: list[dict],
                     family: Family = LLAMA) -> ModulewiseDecay:
    """--wd_scheduler alphadecay (or the official --use_modulewise_wd with a spectral metric)."""
    return ModulewiseDecay.from_config(config, model, param_groups, family)
