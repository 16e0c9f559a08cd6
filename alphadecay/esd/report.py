"""`python -m alphadecay.esd PATH`: the spectral report of a saved model, and the decays AlphaDecay would assign.

PATH is the `save_pretrained` directory of any Hugging Face causal LM (config.json + weights: LLaMA, GPT-2, Qwen2,
Mistral, GPT-NeoX, ...), one of our checkpoints (`model_<step>`; an FSDP run's is read from its DCP shards when it
has no model.safetensors), a run directory (its latest checkpoint), a hub model name (e.g. `gpt2`; offline, a
clear error naming the local alternatives), or a LLaMA config JSON such as configs/llama_60m.json (the model as
initialised with --seed, i.e. what AlphaDecay's pass at update 0 sees). One
row per weight module (nn.Linear, nn.Conv2d, Hugging Face's Conv1D: alphadecay.wd.weight_modules) in module order,
of its matrix (out, in) (a Conv1D's weight transposed: `module_matrix`): shape, alpha, KS distance D, spectral norm
sigma_max (the true one, sqrt of the largest eigenvalue of WᵀW), stable rank, and the weight decay AlphaDecay would
give it for --weight_decay/--wd_min_ratio/--wd_max_ratio and the fit and exclusion flags (blank for modules it leaves
at the base decay: the same modules as the library's, `tuned_modules`, so a tied head such as GPT-2's lm_head is
never tuned); then the mean alpha of the attention and the MLP matrices and the spread of the assigned decays.
`--json FILE` writes
{"modules": [{"name", "shape", "alpha", "D", "sigma_max", "stable_rank", "weight_decay"}, ...]}.
`--esd_estimator farms` fits alpha on FARMS' fixed-aspect-ratio submatrices (alphadecay/esd/spectral.py). `--plot DIR`
draws each module's log-log ESD with its fitted power law (`esd_<module>.png`, `esd_farms_<module>.png` for
FARMS; `--plot_modules REGEX` limits them) and one overview of alpha and the assigned decay per module
(`alpha_and_decay_by_module[_farms].png`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from alphadecay import esd
from alphadecay.wd.assign import assign
from alphadecay.config import add_config_flags, check_farms
from alphadecay.errors import UserError
from alphadecay.wd.methods.modulewise import SPECTRAL_METRICS, tuned_modules
from alphadecay.wd.groups import (ATTENTION_KINDS, MLP_KINDS, layer_index, module_kind, module_matrix,
                                  weight_modules)

OFFLINE_MODEL_HINT = ("Without the hub, give a local save_pretrained directory (model.save_pretrained(DIR) where the "
                      "hub is reachable, or a copy of the model's hub repository), a checkpoint model_<step> or run "
                      "directory of ours, or a LLaMA config JSON (configs/llama_60m.json).")


# The training flags this report takes too: how alpha is estimated and which modules AlphaDecay tunes.
ESTIMATOR_FLAGS = ("assign_func", "pl_fitting", "esd_estimator", "farms_window", "farms_aspect_ratio",
                   "farms_windows_per_dim", "farms_min_step", "official_fix_finger", "xmin_pos", "filter_zeros",
                   "remove_first_layer", "remove_last_layer", "wd_exclude")


def load_model(path: str, seed: int = 0) -> torch.nn.Module:
    """The model PATH names (module docstring), in float32."""
    from alphadecay.checkpoint import find_model_dir
    from alphadecay.data import check_hub_reachable, is_hub_name

    if path.endswith(".json") and os.path.isfile(path):  # a model config: the freshly initialised model
        from alphadecay.model import build_model, load_model_config

        return build_model(load_model_config(path), seed=seed)
    if os.path.exists(path):
        path = find_model_dir(path)  # a run directory: its latest checkpoint (verified)
        from alphadecay import sharded_checkpoint

        if (sharded_checkpoint.is_sharded_checkpoint(path)  # an FSDP run's checkpoint without a save_pretrained copy
                and not os.path.isfile(os.path.join(path, "model.safetensors"))):
            return sharded_checkpoint.load_model(path)
    elif is_hub_name(path):
        check_hub_reachable(f"the model {path}", hint=OFFLINE_MODEL_HINT)  # offline: an error within seconds
    else:
        raise UserError(f"{path}: no such file or directory, and not a hub model name (owner/name). Give a "
                        "save_pretrained directory, a checkpoint model_<step>, a run directory, a hub model name or a "
                        "LLaMA config JSON (configs/llama_60m.json).")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a causal language model transformers can load ({err}).") from None


def report(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """One dict per weight module: its matrix's spectral statistics and the decay AlphaDecay would assign."""
    modules = weight_modules(model)
    stats = esd.module_metrics([(n, module_matrix(m)) for n, m in modules], fit=args.pl_fitting, xmin_pos=args.xmin_pos,
                               filter_zeros=args.filter_zeros, official_fix_finger=args.official_fix_finger,
                               estimator=args.esd_estimator, farms=farms(args))
    tuned = tuned_modules(model, remove_first=args.remove_first_layer, remove_last=args.remove_last_layer,
                          exclude=args.wd_exclude, min_eigs=esd.EIGS_THRESH)
    blocks = [layer_index(n) if layer_index(n) is not None else n for n in tuned]  # as ModulewiseDecay groups them
    scores = [stats[n][args.esd_metric_for_tb] for n in tuned]
    multipliers = dict(zip(tuned, assign(args.assign_func, scores, blocks=blocks, min_ratio=args.wd_min_ratio,
                                         max_ratio=args.wd_max_ratio)))
    rows = []
    for name, module in modules:
        s = stats[name]
        rows.append({"name": name, "shape": list(module_matrix(module).shape), "alpha": s["alpha"], "D": s["D"],
                     "sigma_max": math.sqrt(s["spectral_norm"]), "stable_rank": s["stable_rank"],
                     "weight_decay": args.weight_decay * multipliers[name] if name in multipliers else None})
    return rows


def farms(args: argparse.Namespace) -> esd.FarmsSampling:
    return esd.FarmsSampling.from_flags(args)


def shape_summary(rows: list[dict], base_decay: float) -> str:
    """The attention-vs-MLP split: mean alpha of the attention matrices (q,k,v,o; fused qkv and the output proj)
    against the MLP's (gate,up,down; fc1,fc2), all of them, and the spread of the decay multipliers AlphaDecay
    assigns (tuned modules only)."""
    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def kind(r: dict) -> str:
        return module_kind(r["name"])

    attn = mean([r["alpha"] for r in rows if kind(r) in ATTENTION_KINDS])
    mlp = mean([r["alpha"] for r in rows if kind(r) in MLP_KINDS])
    attn_names = ",".join(k for k in ATTENTION_KINDS if any(kind(r) == k for r in rows)) or "none"
    mlp_names = ",".join(k for k in MLP_KINDS if any(kind(r) == k for r in rows)) or "none"
    line = f"mean alpha: attention ({attn_names}) {attn:.3f}, MLP ({mlp_names}) {mlp:.3f}, gap {mlp - attn:+.3f}"
    tuned = [r for r in rows if r["weight_decay"] is not None]
    if tuned and base_decay > 0:
        mult = [r["weight_decay"] / base_decay for r in tuned]
        attn_m = mean([r["weight_decay"] / base_decay for r in tuned if kind(r) in ATTENTION_KINDS])
        mlp_m = mean([r["weight_decay"] / base_decay for r in tuned if kind(r) in MLP_KINDS])
        ratio = f" (MLP/attention {mlp_m / attn_m:.2f}x)" if attn_m > 0 else ""
        line += (f"\ndecay multipliers: min {min(mult):.3f}, max {max(mult):.3f}; mean attention {attn_m:.3f}, "
                 f"mean MLP {mlp_m:.3f}{ratio}")
    return line


def plot(model: torch.nn.Module, rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The per-module ESD figures and the overview figure, written to args.plot; returns the paths."""
    from alphadecay import plot as plots

    os.makedirs(args.plot, exist_ok=True)
    weights = [module_matrix(m).detach() for _, m in weight_modules(model)]
    is_farms = args.esd_estimator == "farms"
    spectra = esd.farms_eigenvalues(weights, farms(args)) if is_farms else esd.eigenvalues(weights)
    tag = "_farms" if is_farms else ""
    written = []
    for row, eigs in zip(rows, spectra):
        if args.plot_modules is not None and not re.search(args.plot_modules, row["name"]):
            continue
        xmin, n_tail = esd.fitted_xmin(eigs, row["alpha"])
        fig = plots.esd_figure(row["name"], eigs.cpu().numpy(), alpha=row["alpha"], d=row["D"], xmin=xmin,
                               n_tail=n_tail, fit=args.pl_fitting, estimator=args.esd_estimator)
        written.append(plots.save(fig, os.path.join(args.plot, f"esd{tag}_{row['name']}.png")))
    title = (f"alpha per module ({args.pl_fitting} fit, {'FARMS' if is_farms else 'whole-matrix ESD'}) and the decay "
             f"AlphaDecay assigns (ratios {args.wd_min_ratio:g}..{args.wd_max_ratio:g}); {args.path}")
    fig = plots.overview_figure(rows, base_decay=args.weight_decay, title=title)
    written.append(plots.save(fig, os.path.join(args.plot, f"alpha_and_decay_by_module{tag}.png")))
    return written


def format_table(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'module':<{width}}  {'shape':>12}  {'alpha':>7}  {'D':>6}  {'sigma_max':>9}  {'st.rank':>7}  {'decay':>9}"]
    for r in rows:
        decay = f"{r['weight_decay']:.3g}" if r["weight_decay"] is not None else "-"
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<{width}}  {shape:>12}  {r['alpha']:>7.3f}  {r['D']:>6.3f}  {r['sigma_max']:>9.3f}  "
                     f"{r['stable_rank']:>7.2f}  {decay:>9}")
    return "\n".join(lines)


def type_means(rows: list[dict]) -> str:
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(module_kind(r["name"]), []).append(r["alpha"])
    return "mean alpha by type: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in by_kind.items())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alphadecay.esd", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="save_pretrained directory of a causal LM, checkpoint model_<step>, run "
                        "directory, hub model name, or LLaMA config JSON")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="base decay the multipliers scale")
    parser.add_argument("--wd_min_ratio", type=float, default=0.6666)
    parser.add_argument("--wd_max_ratio", type=float, default=5.0)
    parser.add_argument("--esd_metric_for_tb", default="alpha", choices=sorted(SPECTRAL_METRICS - {"gradnorm_d_weightnorm"}))
    add_config_flags(parser, ESTIMATOR_FLAGS)  # as in training: same meaning, type and default
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--plot", metavar="DIR", help="write the ESD and overview figures (PNG) to this directory")
    parser.add_argument("--plot_modules", metavar="REGEX",
                        help="draw the ESD figures only of the modules whose name matches (the overview has all)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed when PATH is a model config JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        check_farms(args.farms_window, args.farms_aspect_ratio, args.farms_windows_per_dim, args.farms_min_step)
        if args.plot_modules is not None:
            try:
                re.compile(args.plot_modules)
            except re.error as err:
                raise UserError(f"--plot_modules {args.plot_modules!r} is not a valid regular expression: {err}.")
        model = load_model(args.path, seed=args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        rows = report(model, args)
    print(format_table(rows))
    print(type_means(rows))
    print(shape_summary(rows, args.weight_decay))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"modules": rows}, fh, indent=1)
    if args.plot:
        with torch.no_grad():
            written = plot(model, rows, args)
        print(f"wrote {len(written)} figures to {args.plot}")
    return 0
