"""`python -m alphadecay.esd PATH`: the spectral report of a saved model, and the decays AlphaDecay would assign.

PATH is a `save_pretrained` directory (config.json + weights), one of our checkpoints (`model_<step>`), or a
run directory (its latest checkpoint). One row per Linear module in module order: shape, alpha, KS distance D,
spectral norm sigma_max (the true one, sqrt of the largest eigenvalue of WᵀW), stable rank, and the weight decay
AlphaDecay would give it for --weight_decay/--wd_min_ratio/--wd_max_ratio and the fit and exclusion flags
(blank for modules it leaves at the base decay). `--json FILE` writes
{"modules": [{"name", "shape", "alpha", "D", "sigma_max", "stable_rank", "weight_decay"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from alphadecay import esd
from alphadecay.assign import assign
from alphadecay.config import ASSIGN_FUNCS, PL_FITTINGS, _str2bool
from alphadecay.errors import UserError
from alphadecay.modulewise import SPECTRAL_METRICS, tuned_modules
from alphadecay.param_groups import LINEAR_KINDS, layer_index, linear_modules


def load_model(path: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from alphadecay.checkpoint import find_checkpoint

    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):  # a run directory: its latest checkpoint
        path = find_checkpoint(path)
    try:
        return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a save_pretrained model directory ({err}).") from None


def report(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """One dict per Linear module: its spectrum's statistics and the decay AlphaDecay would assign."""
    linears = linear_modules(model)
    stats = esd.module_metrics([(n, m.weight) for n, m in linears], fit=args.pl_fitting, xmin_pos=args.xmin_pos,
                               filter_zeros=args.filter_zeros, official_fix_finger=args.official_fix_finger)
    tuned = tuned_modules(model, remove_first=args.remove_first_layer, remove_last=args.remove_last_layer,
                          exclude=args.wd_exclude, min_eigs=esd.EIGS_THRESH)
    blocks = [layer_index(n) if layer_index(n) is not None else n for n in tuned]  # as ModulewiseDecay groups them
    scores = [stats[n][args.esd_metric_for_tb] for n in tuned]
    multipliers = dict(zip(tuned, assign(args.assign_func, scores, blocks=blocks, min_ratio=args.wd_min_ratio,
                                         max_ratio=args.wd_max_ratio)))
    rows = []
    for name, module in linears:
        s = stats[name]
        rows.append({"name": name, "shape": list(module.weight.shape), "alpha": s["alpha"], "D": s["D"],
                     "sigma_max": math.sqrt(s["spectral_norm"]), "stable_rank": s["stable_rank"],
                     "weight_decay": args.weight_decay * multipliers[name] if name in multipliers else None})
    return rows


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
        by_kind.setdefault(LINEAR_KINDS.get(r["name"].rsplit(".", 1)[-1], "linear"), []).append(r["alpha"])
    return "mean alpha by type: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in by_kind.items())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alphadecay.esd", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="save_pretrained directory, checkpoint model_<step>, or run directory")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="base decay the multipliers scale")
    parser.add_argument("--wd_min_ratio", type=float, default=0.6666)
    parser.add_argument("--wd_max_ratio", type=float, default=5.0)
    parser.add_argument("--esd_metric_for_tb", default="alpha", choices=sorted(SPECTRAL_METRICS - {"gradnorm_d_weightnorm"}))
    parser.add_argument("--assign_func", default="tb_linear_map", choices=ASSIGN_FUNCS)
    parser.add_argument("--pl_fitting", default="median", choices=PL_FITTINGS)
    parser.add_argument("--official_fix_finger", nargs="?", const=True, default=False, type=_str2bool,
                        help="fix-finger with the official lower bound log10(0.95 peak), compared with linear "
                             "eigenvalues (default: 0.95 peak, the intended bound)")
    parser.add_argument("--xmin_pos", type=float, default=2.0)
    parser.add_argument("--filter_zeros", nargs="?", const=True, default=False, type=_str2bool)
    parser.add_argument("--remove_first_layer", nargs="?", const=True, default=True, type=_str2bool)
    parser.add_argument("--remove_last_layer", nargs="?", const=True, default=True, type=_str2bool)
    parser.add_argument("--wd_exclude", nargs="*", default=[], help="regular expressions of modules not tuned")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        model = load_model(args.path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        rows = report(model, args)
    print(format_table(rows))
    print(type_means(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"modules": rows}, fh, indent=1)
    return 0
