"""The registry of weight-decay methods and their options: names, one-line descriptions, defaults, and the official
flag each option stands for.

Standard library only: the training configs (alphadecay/config.py, alphadecay/vit/config.py) take their
`--wd_scheduler` choices from METHODS, and scripts/make_tables.py reads the configs without torch.

A method is one file with a builder `build(model, options) -> rule` and one line in METHODS. A rule is what
computes the decays; `alphadecay.wd.create` wraps it in a `Scheduler`, which counts the updates and applies the
decays to the optimizer's groups by name (alphadecay/wd/scheduler.py):

    rule.step(update, model) -> WDUpdate | None
        `update` is the 0-based optimizer update, `model` the unwrapped model; called after backward() (and
        clipping), before optimizer.step(). Returns per-module decay multipliers (module name -> m: the module's
        group gets base decay x m), or one multiplier for every group, and scalars to log; None when nothing
        changes. The result must be identical on every rank.
    rule.state_dict() / rule.load_state_dict(state)
        Everything needed to resume exactly.
    rule.modules: list[str]
        The modules whose groups it sets (their groups must each hold one of them and nothing else tuned).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from alphadecay.errors import UserError


class WeightDecayError(UserError, ValueError):
    """A mistake in how the library is used (an unknown method or option, optimizer groups it cannot address, a
    step() without gradients): the message says what to do. The training entry points print it as one paragraph
    (a UserError); to other code it is a ValueError."""


METRICS = ("alpha", "alphahat", "spectral_norm", "stable_rank", "entropy", "fnorm", "gradnorm",
           "gradnorm_d_weightnorm")
ASSIGN_FUNCS = ("tb_linear_map", "tb_sqrt", "tb_log2", "layerwise_sigmoid")
FITS = ("median", "fix-finger", "goodness-of-fit")
ESTIMATORS = ("full", "farms")  # alphadecay/esd/spectral.py
TIMINGS = ("llama", "vit")


@dataclass(frozen=True)
class Option:
    default: Any
    flag: str | None  # the official command-line flag it maps to one-to-one (None: ours only)
    help: str
    choices: tuple | None = None


OPTIONS: dict[str, Option] = {
    # -- module-wise (AlphaDecay, AdaDecay) --
    "every": Option(500, "unbalancedWD_every", "a pass at the first step() and whenever (update + 1) % every == 0 "
                    "(timing 'llama')"),
    "timing": Option("llama", None, "'llama': the official LLaMA code's passes (above; the first on the initial "
                     "weights with placeholder gradient norms); 'vit': the official ViT code's, at the first update of "
                     "every epoch on that update's gradients (needs updates_per_epoch; also drops matrices with fewer "
                     "than 50 eigenvalues whatever the metric)", TIMINGS),
    "updates_per_epoch": Option(None, None, "optimizer updates per epoch, for timing 'vit'"),
    "min_ratio": Option(0.6666, "wd_min_ratio", "decay multiplier of the module with the smallest metric "
                        "(tb_linear_map)"),
    "max_ratio": Option(3.0, "wd_max_ratio", "decay multiplier of the module with the largest metric (tb_linear_map)"),
    "metric": Option("alpha", "esd_metric_for_tb", "per-module metric: alpha, alphahat, spectral_norm, stable_rank, "
                     "entropy, fnorm, gradnorm, gradnorm_d_weightnorm", METRICS),
    "assign": Option("tb_linear_map", "assign_func", "metric-to-multiplier map: tb_linear_map, tb_sqrt, tb_log2, "
                     "layerwise_sigmoid", ASSIGN_FUNCS),
    "apply_mapping": Option(True, "alpha_positively_with_WD", "apply the map (False: measure and log only)"),
    "fit": Option("median", "pl_fitting", "power-law fit: median, fix-finger, goodness-of-fit", FITS),
    "estimator": Option("full", "esd_estimator", "ESD the fit uses: full (the whole matrix) or farms (FARMS "
                        "submatrices)", ESTIMATORS),
    "xmin_pos": Option(2.0, "xmin_pos", "median fit: xmin is eigenvalue number int(N / xmin_pos)"),
    "filter_zeros": Option(False, "filter_zeros", "drop eigenvalues <= 1e-5 before fitting"),
    "official_fix_finger": Option(False, "official_fix_finger", "fix-finger with the official log10 lower bound"),
    "farms_window": Option(2000, "farms_window", "FARMS: short side of each submatrix"),
    "farms_aspect_ratio": Option(1.0, "farms_aspect_ratio", "FARMS: long side / short side of each submatrix"),
    "farms_windows_per_dim": Option(15, "farms_windows_per_dim", "FARMS: submatrix positions along each dimension"),
    "farms_min_step": Option(0.05, "farms_min_step", "FARMS: neighbouring positions at least this fraction of the "
                             "submatrix's side apart (0 = the FARMS authors' positions)"),
    "remove_first": Option(True, "remove_first_layer", "leave the first weight module in module order untuned"),
    "remove_last": Option(True, "remove_last_layer", "leave the last weight module (the output head) untuned"),
    "exclude": Option((), "wd_exclude", "regular expressions: weight modules whose name matches one are not tuned"),
    "official_adadecay_init": Option(False, "official_adadecay_init", "AdaDecay: decay 0 until the first in-loop "
                                     "pass, as the official integer placeholder gives"),
    "sigmoid_slope": Option(4.0, None, "layerwise_sigmoid: multiplier 2*sigmoid(slope * z)"),
    "eigs_thresh": Option(50, None, "matrices with fewer eigenvalues are not tuned by spectral metrics"),
    # -- AWD --
    "awd_multiplier": Option(100.0, "awd_multiplier", "AWD's lambda_awd = awd_multiplier x weight_decay (official: "
                             "100 for LLaMA, 50 for the ViT)"),
    "weight_decay": Option(None, "weight_decay", "AWD's base decay; default: the largest base decay of the "
                           "optimizer's groups"),
}

MODULEWISE_OPTIONS = ("every", "timing", "updates_per_epoch", "min_ratio", "max_ratio", "metric", "assign",
                      "apply_mapping", "fit", "estimator", "xmin_pos", "filter_zeros", "official_fix_finger",
                      "farms_window", "farms_aspect_ratio", "farms_windows_per_dim", "farms_min_step", "remove_first",
                      "remove_last", "exclude", "official_adadecay_init", "sigmoid_slope", "eigs_thresh")


@dataclass(frozen=True)
class Method:
    """A registered weight-decay method."""

    builder: str  # "module:function", imported when a scheduler is created
    about: str  # one line
    options: tuple[str, ...] = ()  # the OPTIONS it takes
    defaults: dict[str, Any] = field(default_factory=dict)  # option values the name implies
    flags: dict[str, Any] = field(default_factory=dict)  # the official flags it stands for (the configs' --wd_scheduler)


METHODS: dict[str, Method] = {
    "uniform": Method("alphadecay.wd.methods.uniform:build", "one decay for all (the paper's Uniform)"),
    "awd": Method("alphadecay.wd.methods.awd:build", "AWD, Ghiasi et al. 2023: every update one decay for all, "
                  "a moving average of awd_multiplier x wd x ||g|| / ||w|| (the paper's baseline1)",
                  ("awd_multiplier", "weight_decay"), flags={"use_AWD_NeurIPS2023": True}),
    "adadecay": Method("alphadecay.wd.methods.adadecay:build", "AdaDecay, Nakamura & Hong 2019: per module "
                       "2*sigmoid(4z) of its gradient norm z-scored within its block (the paper's baseline2)",
                       MODULEWISE_OPTIONS, {"metric": "gradnorm", "assign": "layerwise_sigmoid"},
                       {"use_modulewise_wd": True, "alpha_positively_with_WD": True, "esd_metric_for_tb": "gradnorm",
                        "assign_func": "layerwise_sigmoid"}),
    "alphadecay": Method("alphadecay.wd.methods.modulewise:build", "AlphaDecay, He et al. 2025: per module, the "
                         "ESD's power-law alpha mapped linearly onto [min_ratio, max_ratio] x wd",
                         MODULEWISE_OPTIONS, {"metric": "alpha", "assign": "tb_linear_map"},
                         {"use_modulewise_wd": True, "alpha_positively_with_WD": True, "esd_metric_for_tb": "alpha",
                          "assign_func": "tb_linear_map"}),
}


def available() -> dict[str, str]:
    """Each registered method's name with its one-line description."""
    return {name: method.about for name, method in METHODS.items()}


def method(name: str) -> Method:
    """The registered method `name`, or an error listing the valid names."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WeightDecayError(f"unknown weight-decay method {name!r}{hint}; the registered ones are: "
                               f"{', '.join(METHODS)} (alphadecay.wd.available() describes each).")
    return METHODS[name]


def resolve_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every option of method `name`: its defaults, then the name's implied values, then `given`. An option the
    method does not take is an error listing the ones it does."""
    entry = method(name)
    unknown = [key for key in given if key not in entry.options]
    if unknown:
        valid = ", ".join(entry.options) if entry.options else "none"
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, entry.options, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise WeightDecayError(f"weight-decay method {name!r} takes no option {', '.join(hints)}; its options are: "
                               f"{valid}.")
    resolved = {**{key: OPTIONS[key].default for key in entry.options}, **entry.defaults, **given}
    for key, value in resolved.items():
        choices = OPTIONS[key].choices
        if choices is not None and value not in choices:
            raise WeightDecayError(f"weight-decay method {name!r}: option {key}={value!r} is not one of "
                                   f"{', '.join(choices)}.")
    return resolved


def options_from_flags(config: Any, name: str) -> dict[str, Any]:
    """The options of method `name` from a training configuration's official flags (any object with the flags as
    attributes: TrainConfig, ViTConfig), one-to-one; options without a flag keep their defaults."""
    entry = method(name)
    options = {}
    for key in entry.options:
        flag = OPTIONS[key].flag
        if flag is not None and hasattr(config, flag):
            value = getattr(config, flag)
            options[key] = tuple(value) if isinstance(value, list) else value
    return options
