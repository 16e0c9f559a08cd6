"""Layerwise scaling rules: per-group learning rates and weight decays that transfer across widths.

Fan, Liu, Zhao, Yuan, Gu, "Robust Layerwise Scaling Rules by Proper Weight Decay Tuning" (arXiv 2510.15262; no
public code, so this module is the reference implementation). The paper's claims, as methods.md §2.1 gives them:
- under AdamW a pre-norm transformer soon reaches an optimizer-governed steady state in which each matrix's
  singular values scale as √(η/λ), and across widths d the top singular value as ≈ √(η/λ)·d^0.75;
- with μP's learning-rate rule for matrix-like parameters, η₂ ∝ 1/d, keeping the top singular value (and so
  the sublayer gain) width-invariant therefore needs λ₂ ∝ √d; vector-like parameters keep η₁ constant, λ₁ = 0;
- tuned on a narrow proxy (width d₀), η and λ then transfer zero-shot to a wide target.

Hence, for a model of hidden size d and a proxy of hidden size d₀ = --base_width, with --lr and --weight_decay
the values tuned on the proxy:

    rule      matrix-like groups                      vector-like groups
    none      lr x 1,       decay x 1                 lr x 1, decay x 1    (standard parameterisation)
    fan2025   lr x d₀/d,    decay x √(d/d₀)           lr x 1, decay 0      (the full rule)
    mup_lr    lr x d₀/d,    decay x 1                 lr x 1, decay x 1    (μP's lr rule alone, for comparison)

Classification (by role, checked against shape): matrix-like = the Linear weights whose two dimensions both grow
with d: q, k, v, o, gate, up, down (and any other hidden Linear). Vector-like = at most one dimension grows with
d: RMSNorm gains, biases and the token embedding (vocab x d; methods.md §2.2). The output head (d x vocab) is a
choice, --scaling_head:
- `matrix` (the default): lr x d₀/d and decay x √(d/d₀). Our LLaMA has no μP output multiplier (an untied head
  initialised like every other Linear), and for such an output layer μP under Adam prescribes lr ∝ 1/fan_in
  (Yang et al. 2022, Tensor Programs V, arXiv 2203.03466, its μP table without output multipliers; recalled, not
  re-checked against the text): an Adam update changes each logit by ~η per input coordinate, i.e. by ~η·d in
  all, so a width-independent logit change needs η ∝ 1/d. Its decay then follows the matrix rule, so the head
  stays decayed, as in the AlphaDecay setting (which decays every parameter).
- `vector`: lr x 1, decay 0: μP's literal shape classification (one dimension grows with d), which the `mup`
  package pairs with a 1/width output multiplier that this model does not have.

The rule sets each group's `lr_scale` (the trainer uses lr = schedule x lr_scale) and its `base_weight_decay`.
Weight-decay schedulers multiply base_weight_decay by per-group multipliers, so a module-wise decay (AlphaDecay,
AdaDecay, AWD) composes multiplicatively with the rule's per-group decay, and vector groups stay at 0
(methods.md §2.2, "composition"). The decay is torch's: decoupled `lr·λ·p` under AdamW, which is what the rule
is derived for (config.validate refuses fan2025 with coupled-L2 Adam).
"""

from __future__ import annotations

import math

from alphadecay.config import SCALING_HEADS, SCALING_RULES

MATRIX_KINDS = frozenset({"q", "k", "v", "o", "gate", "up", "down", "linear"})


def parameter_class(group: dict, *, head: str = "matrix") -> str:
    """'matrix' or 'vector' for a named parameter group (see the module docstring); `head` classifies lm_head."""
    if head not in SCALING_HEADS:
        raise ValueError(f"head must be one of {SCALING_HEADS}, got {head!r}")
    kind = group["kind"]
    cls = head if kind == "head" else "matrix" if kind in MATRIX_KINDS else "vector"
    if cls == "matrix" and any(p.dim() != 2 for p in group["params"]):
        raise ValueError(f"group {group['name']!r} mixes a matrix with vectors (a bias?); the rule needs them in "
                         "separate groups")
    return cls


def rule_multipliers(cls: str, *, rule: str, width: int, base_width: int | None) -> tuple[float, float]:
    """(learning-rate multiplier, weight-decay multiplier) of a parameter class under `rule` at `width`."""
    if rule not in SCALING_RULES:
        raise ValueError(f"rule must be one of {SCALING_RULES}, got {rule!r}")
    if rule == "none":
        return 1.0, 1.0
    if base_width is None or base_width <= 0 or width <= 0:
        raise ValueError(f"rule {rule!r} needs positive widths, got width={width}, base_width={base_width}")
    if cls == "vector":
        return 1.0, (0.0 if rule == "fan2025" else 1.0)
    ratio = width / base_width
    return 1.0 / ratio, (math.sqrt(ratio) if rule == "fan2025" else 1.0)


def apply_scaling_rule(param_groups: list[dict], *, rule: str, width: int, base_width: int | None,
                       head: str = "matrix") -> list[dict]:
    """Scale each group's lr_scale and base decay in place (the current decay follows); returns the groups.

    `width` is the model's hidden_size and `base_width` the proxy's. Call it on freshly built groups, before
    the optimizer exists; the multipliers compose with whatever the groups already carry.
    """
    for group in param_groups:
        lr_mult, wd_mult = rule_multipliers(parameter_class(group, head=head), rule=rule, width=width,
                                            base_width=base_width)
        group["lr_scale"] *= lr_mult
        group["base_weight_decay"] *= wd_mult
        group["weight_decay"] = group["base_weight_decay"] * group["wd_multiplier"]
    return param_groups
