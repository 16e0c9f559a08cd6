"""The registry of weight-decay methods and their options: names, one-line descriptions, defaults, and the official
flag each option stands for.

Standard library only: the training configs (alphadecay/config.py, alphadecay/vit/config.py) take their
`--wd_scheduler` choices from `names()`, and scripts/make_tables.py reads the configs without torch.

A method is one file with a builder `build(model, optimizer, options) -> rule` and one line in METHODS. A rule is
what computes the decays; `alphadecay.wd.create` wraps it in a `Scheduler`, which counts the updates and applies the
decays to the optimizer's groups by name (alphadecay/wd/scheduler.py):

    rule.step(update, model) -> WDUpdate | None
        `update` is the 0-based optimizer update, `model` the unwrapped model; called after backward() (and
        clipping), before optimizer.step(). Returns per-module decay multipliers (module name -> m: the module's
        group gets base decay x m), or one multiplier for every group, or per-group factors for this update
        (`scales`, one per optimizer group in order), and scalars to log; None when nothing changes. The result
        must be identical on every rank.
    rule.apply_decay(groups) -> dict | None          (optional)
        A rule that applies the decoupled decay itself (cautious: a per-element mask). The scheduler then gives
        torch's `weight_decay` 0 in every group and calls this once per update, after every group's decay is set
        (its `effective_weight_decay`) and before optimizer.step().
    rule.state_dict() / rule.load_state_dict(state)
        Everything needed to resume exactly.
    rule.modules: list[str]
        The modules whose groups it sets (their groups must each hold one of them and nothing else tuned).

Two kinds of method (`Method.kind`). A "multipliers" method sets how much each group decays (Uniform, AWD,
AdaDecay, AlphaDecay). A "form" sets how a group's decay is applied at each update (AdamC's lr_t / lr_max,
independent decay's 1 / lr_max, SWD's 1 / sqrt(v_bar), cautious decay's mask), to whatever decay the groups have.
A form alone runs on the groups' base decays; `"MULTIPLIERS+FORM"` (e.g. `alphadecay+cautious`) runs both, the form
applied to the module-wise decays: `names()` lists every valid name.
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
ADAMC_GROUPS = ("matrices", "all")


@dataclass(frozen=True)
class Option:
    default: Any
    flag: str | None  # the command-line flag it maps to one-to-one, the official one where it exists (None: none)
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
    # -- the forms that read the learning rate (adamc, independent) --
    "peak_lr": Option(None, "lr", "the learning rate's peak lr_max (a group with an lr_scale, set by the layerwise "
                      "scaling rules, peaks at peak_lr x lr_scale); default: each group's initial_lr, which torch's LR "
                      "schedulers set"),
    "adamc_groups": Option("matrices", "adamc_groups", "the groups AdamC corrects: 'matrices' (groups holding a "
                           "parameter with two or more dimensions larger than 1: weight matrices, convolution "
                           "kernels, embeddings; the others keep AdamW's decay) or 'all'", ADAMC_GROUPS),
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
    flags: dict[str, Any] = field(default_factory=dict)  # the official flags it stands for (configs' --wd_scheduler)
    # "multipliers" or "form" (the module docstring); method("multipliers+form") describes a combination of the two
    # with kind "combination"
    kind: str = "multipliers"
    # The unit of the base decay it expects (DECAY_UNITS), which the timescale rule (timescale_weight_decay) needs.
    decay_unit: str = "adamw"


# "adamw": AdamW's decoupled decay at the peak lr (p <- p - lr_t * decay * p); "lr_max": decay / lr_max is AdamW's
# (independent decay, e.g. 1e-4 where AdamW takes 0.1 at lr 1e-3); "adaptive": the decay applied is the base decay
# times a statistic of the gradients (AWD's ||g|| / ||w||, SWD's 1 / sqrt(v_bar)), unknown before training.
DECAY_UNITS = ("adamw", "lr_max", "adaptive")


METHODS: dict[str, Method] = {
    "uniform": Method("alphadecay.wd.methods.uniform:build", "one decay for all (the paper's Uniform)"),
    "awd": Method("alphadecay.wd.methods.awd:build", "AWD, Ghiasi et al. 2023: every update one decay for all, "
                  "a moving average of awd_multiplier x wd x ||g|| / ||w|| (the paper's baseline1)",
                  ("awd_multiplier", "weight_decay"), flags={"use_AWD_NeurIPS2023": True}, decay_unit="adaptive"),
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
    # -- forms (2023-2025): how each group's decay is applied at every update; AdamW only --
    "adamc": Method("alphadecay.wd.methods.adamc:build", "AdamC, Defazio et al. 2025: corrected decay wd x lr_t / "
                    "lr_max on matrix groups (adamc_groups='all': every group)", ("peak_lr", "adamc_groups"),
                    kind="form"),
    "independent": Method("alphadecay.wd.methods.independent:build", "independent decay, Wortsman et al. 2023: "
                          "wd / lr_max, so an update removes (lr_t / lr_max) x wd x p", ("peak_lr",), kind="form",
                          decay_unit="lr_max"),
    "cautious": Method("alphadecay.wd.methods.cautious:build", "cautious decay, Chen et al. 2025: decay only the "
                       "entries where Adam's update and the weight have the same sign", kind="form"),
    "swd": Method("alphadecay.wd.methods.swd:build", "stable weight decay (AdamS), Xie et al. 2023: wd / sqrt(v_bar), "
                  "v_bar the mean of Adam's bias-corrected second moment over every parameter entry", kind="form",
                  decay_unit="adaptive"),
}


def available() -> dict[str, str]:
    """Each registered method's name with its one-line description."""
    return {name: method.about for name, method in METHODS.items()}


def combinations() -> list[str]:
    """Every "multipliers+form" name: a method that sets per-group decays (not uniform, which sets none) with a
    form applied to them."""
    multipliers = [n for n, m in METHODS.items() if m.kind == "multipliers" and n != "uniform"]
    return [f"{m}+{f}" for m in multipliers for f, entry in METHODS.items() if entry.kind == "form"]


def names() -> list[str]:
    """Every valid method name: the registered ones, then the combinations (the configs' --wd_scheduler choices)."""
    return list(METHODS) + combinations()


def parts(name: str) -> list[str]:
    """The registered methods a name stands for: [name], or [multipliers, form] for a combination; an error that
    says what is valid otherwise."""
    name = str(name)
    if name in METHODS:
        return [name]
    if "+" not in name:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WeightDecayError(f"unknown weight-decay method {name!r}{hint}; the registered ones are: "
                               f"{', '.join(METHODS)} (alphadecay.wd.available() describes each), and combinations "
                               "MULTIPLIERS+FORM such as alphadecay+cautious.")
    pieces = name.split("+")
    for piece in pieces:
        if piece not in METHODS:
            try:
                parts(piece)
            except WeightDecayError as err:  # the unknown-name error, with its suggestion, for this part
                raise WeightDecayError(f"in {name!r}: {err}") from None
    forms = [p for p in pieces if METHODS[p].kind == "form"]
    setters = [p for p in pieces if METHODS[p].kind != "form"]
    what = (f"a combination is one method that sets per-group decays and one form "
            f"({', '.join(n for n, m in METHODS.items() if m.kind == 'form')}) that applies them")
    valid = f"valid combinations: {', '.join(combinations())}"
    if len(forms) > 1:
        raise WeightDecayError(f"weight-decay method {name!r}: {what}; two forms each decide how the decay is applied "
                               f"at every update, which no source defines together; {valid}.")
    if len(pieces) != 2 or len(forms) != 1:
        raise WeightDecayError(f"weight-decay method {name!r}: {what}; {valid}.")
    if setters == ["uniform"]:
        raise WeightDecayError(f"weight-decay method {name!r}: uniform sets no decays, so this is {forms[0]!r} "
                               "alone; use that name.")
    if pieces[0] != setters[0]:
        raise WeightDecayError(f"weight-decay method {name!r}: name the method that sets the decays first, the "
                               f"form second: {setters[0]}+{forms[0]}.")
    return pieces


def method(name: str) -> Method:
    """The registered method `name`, or for a combination its parts' options, defaults and official flags together
    (builder None: `alphadecay.wd.create` builds each part); an error listing the valid names otherwise."""
    pieces = [METHODS[p] for p in parts(name)]
    if len(pieces) == 1:
        return pieces[0]
    setter, form = pieces
    unit = "adaptive" if "adaptive" in (setter.decay_unit, form.decay_unit) else form.decay_unit
    return Method(None, f"{setter.about}; then {form.about}", setter.options + form.options,
                  {**setter.defaults, **form.defaults}, {**setter.flags, **form.flags}, "combination", unit)


def uses_form(name: str) -> bool:
    """Whether method `name` is or contains a form (defined for decoupled decay, AdamW, only)."""
    return any(METHODS[p].kind == "form" for p in parts(name))


def timescale_weight_decay(name: str, *, timescale: float, peak_lr: float, updates: int) -> float:
    """The base decay the AdamW timescale rule (Wang & Aitchison 2024, arXiv 2405.13698) gives method `name`: the
    decay's timescale 1 / (lr_max x decay) in updates is `timescale` x `updates` (a fraction of the run), so AdamW's
    decay is 1 / (peak_lr x timescale x updates), in the unit the method expects (Method.decay_unit)."""
    if not (timescale > 0 and peak_lr > 0 and updates > 0):
        raise WeightDecayError(f"the timescale rule needs a positive timescale, peak lr and number of updates; got "
                               f"{timescale}, {peak_lr}, {updates}.")
    unit = method(name).decay_unit
    if unit == "adaptive":
        raise WeightDecayError(f"weight-decay method {name!r} scales its decay by a statistic of the gradients "
                               "(AWD's ||g|| / ||w||, SWD's 1 / sqrt(v_bar)), so no base decay gives a timescale "
                               "known before training; give the decay itself (--weight_decay).")
    adamw = 1.0 / (peak_lr * timescale * updates)
    return adamw * peak_lr if unit == "lr_max" else adamw


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
