#!/usr/bin/env python3
"""Width-transfer experiment for the layerwise scaling rules (Fan et al. 2025; alphadecay/scaling.py).

    scripts/width_transfer.py                          # CPU default: d = 64,128,256, 3 schemes, a few minutes
    scripts/width_transfer.py --widths 256,512,1024 --layers 8 --steps 5000 --batch_size 64 --max_length 256 \\
        --device cuda --dtype bfloat16 --dataset allenai/c4 --tokenizer t5-base --vocab_size 32000 \\
        --out_dir runs/width_transfer_gpu
    scripts/width_transfer.py ... -- --scheduler cosine          # flags after `--` go to every run

Trains one LLaMA per width (same depth; heads = d / --head_dim so the head dimension is constant; intermediate
= 8/3·d rounded to a multiple of 16) under each scheme, with the same --lr and --weight_decay everywhere: the
values of the proxy, the narrowest width, which is --base_width for the rules. Schemes:
    none     standard parameterisation: lr and decay unchanged at every width
    mup_lr   μP's matrix lr rule alone: η ∝ 1/d
    fan2025  the full rule: matrices η ∝ 1/d and λ ∝ √d, vectors λ = 0
Each run is `torchrun_main.main()` in this process with the real CLI flags (run directory: its config.json,
metrics.jsonl and train.log; checkpoints are deleted unless --keep_checkpoints). Then writes to --out_dir:
- table.md: final train loss (the last 10 updates), final eval loss, mean top singular value per module type,
  mean sublayer gains, and per scheme the least-squares slope of log σ_max against log d;
- width_transfer.png: final eval loss vs width and mean hidden-matrix σ_max vs width (log-log), one line per scheme;
- results.json: the same numbers.
methods.md §2.2 predicts slopes ≈ 0.75 (none), ≈ 0.25 (mup_lr) and ≈ 0 (fan2025) in the optimizer's steady state.
A short run need not reach it, so the table also gives the slope at initialisation (σ_max of N(0, 0.02) weights
grows like √d). The CPU default runs a constant lr after warmup (the steady state is that of constant η and λ)
and a large decay, so that the proxy's decay timescale 1/(ηλ) = 200 updates fits in the run: a 100k-update LLM
run at η = 3e-4, λ = 0.1 spans 3 such timescales. These values were fixed before any result, not tuned.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMES = ("none", "mup_lr", "fan2025")
LABELS = {"none": "SP (none)", "mup_lr": "μP lr only (mup_lr)", "fan2025": "full rule (fan2025)",
          "init": "initialisation"}
PREDICTED_SLOPE = {"none": "≈0.75", "mup_lr": "≈0.25", "fan2025": "≈0", "init": "0.5 (random N(0, σ²))"}
HIDDEN_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
KIND_SETS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "hidden": HIDDEN_KINDS, "head": ("head",)}


def comma_ints(text: str) -> list[int]:
    return sorted(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--widths", type=comma_ints, default=[64, 128, 256],
                        help="hidden sizes; the smallest is the proxy")
    parser.add_argument("--schemes", type=lambda s: s.split(","), default=list(SCHEMES),
                        help=f"subset of {','.join(SCHEMES)}")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the same at every width)")
    parser.add_argument("--head_dim", type=int, default=32, help="attention head dimension (heads = width / head_dim)")
    parser.add_argument("--vocab_size", type=int, default=8000, help="must match the tokenizer")
    parser.add_argument("--steps", type=int, default=200, help="updates per run")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: 10%% of --steps")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per update")
    parser.add_argument("--max_length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=5e-3, help="the proxy's peak learning rate (AdamW)")
    parser.add_argument("--weight_decay", type=float, default=1.0, help="the proxy's decoupled weight decay")
    parser.add_argument("--scheduler", default="constant", help="learning-rate schedule after warmup")
    parser.add_argument("--diagnostics_every", type=int, default=50, help="σ_max and gain logging cadence")
    parser.add_argument("--eval_tokens", type=int, default=20_000, help="validation tokens of the final evaluation")
    parser.add_argument("--dataset", default="data/c4_sample")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default): on a "
                        "2-core machine 2 threads are ~1.5x faster when idle but up to 20x slower when another "
                        "process keeps a core busy")
    parser.add_argument("--out_dir", default="runs/width_transfer")
    parser.add_argument("--keep_checkpoints", action="store_true")
    argv, extra = list(sys.argv[1:] if argv is None else argv), []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    bad = [s for s in args.schemes if s not in SCHEMES]
    if bad:
        parser.error(f"unknown scheme(s) {bad}; choose from {','.join(SCHEMES)}")
    if any(d % args.head_dim for d in args.widths):
        parser.error(f"every width must be a multiple of --head_dim {args.head_dim}")
    return args, extra


def write_model_config(out_dir: Path, width: int, args: argparse.Namespace) -> Path:
    """The LLaMA config JSON of one width, in configs/llama_1m.json's layout."""
    config = json.loads((REPO / "configs" / "llama_1m.json").read_text())
    config.update(hidden_size=width, num_attention_heads=width // args.head_dim, num_hidden_layers=args.layers,
                  intermediate_size=16 * round(8 * width / 3 / 16), vocab_size=args.vocab_size)
    path = out_dir / "configs" / f"llama_d{width}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path


def run_flags(scheme: str, model_config: Path, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """torchrun_main.py flags of one run."""
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    flags = {"model_config": model_config, "dataset": args.dataset, "tokenizer": args.tokenizer,
             "device": args.device, "dtype": args.dtype, "optimizer": "adamw", "lr": args.lr,
             "weight_decay": args.weight_decay, "scheduler": args.scheduler, "batch_size": args.batch_size,
             "total_batch_size": args.batch_size, "max_length": args.max_length, "num_training_steps": args.steps,
             "warmup_steps": warmup, "eval_every": args.steps, "save_every": args.steps, "log_every": 10,
             "target_eval_tokens": args.eval_tokens, "shuffle_buffer": 256, "seed": args.seed,
             "scaling_rule": scheme, "diagnostics_every": args.diagnostics_every, "wandb_mode": "disabled",
             "wandb_name": run_dir.name, "save_dir": run_dir}
    if scheme != "none":
        flags["base_width"] = min(args.widths)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))] + extra


def train(flags: list[str], run_dir: Path, keep_checkpoints: bool) -> None:
    """One run of torchrun_main.main in this process; its console output goes to run_dir/train.log."""
    import torchrun_main

    if run_dir.exists():
        shutil.rmtree(run_dir)  # this script's own previous output for the same run
    run_dir.mkdir(parents=True)
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print("torchrun_main.py " + " ".join(flags), flush=True)
        status = torchrun_main.main(flags)
    if status != 0:
        raise SystemExit(f"run {run_dir} failed (exit status {status}); see {run_dir / 'train.log'}")
    if not keep_checkpoints:
        for checkpoint in run_dir.glob("model_*"):
            shutil.rmtree(checkpoint)


def final_values(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric of a run (train loss: the mean over its last 10 updates)."""
    from alphadecay.metrics import read_metrics

    last: dict[str, float] = {}
    for record in read_metrics(str(run_dir)):
        last.update({k: math.nan if v is None else v for k, v in record.items()
                     if v is None or isinstance(v, (int, float))})
    return last


def init_values(model_config: Path, seed: int) -> dict[str, float]:
    """σ_max means per kind of the freshly initialised model (the same for every scheme)."""
    from alphadecay.diagnostics import top_singular_values
    from alphadecay.model import build_model, load_model_config
    from alphadecay.wd.groups import module_kind

    sigma = top_singular_values(build_model(load_model_config(str(model_config)), seed=seed))
    by_kind: dict[str, list[float]] = {}
    for name, value in sigma.items():
        by_kind.setdefault(module_kind(name), []).append(value)
    return {f"sigma_max_mean/{kind}": float(np.mean(values)) for kind, values in by_kind.items()}


def sigma_of(values: dict[str, float], kinds: tuple[str, ...]) -> float:
    """Mean σ_max over module types (each type's mean weighted equally)."""
    return float(np.mean([values.get(f"sigma_max_mean/{k}", math.nan) for k in kinds]))


def slope(widths: list[int], sigmas: list[float]) -> float:
    """Least-squares slope of log σ against log d."""
    if len(widths) < 2 or not all(math.isfinite(s) and s > 0 for s in sigmas):
        return math.nan
    return float(np.polyfit(np.log(widths), np.log(sigmas), 1)[0])


def write_table(results: dict[str, dict[int, dict[str, float]]], widths: list[int], path: Path, header: str) -> None:
    kinds = HIDDEN_KINDS + ("head",)
    lines = [header, "", "| scheme | d | train loss | eval loss | " + " | ".join(f"σ_max {k}" for k in kinds)
             + " | gain attn | gain mlp |", "|---|---:|---:|---:|" + "---:|" * (len(kinds) + 2)]
    for scheme, by_width in results.items():
        for d in widths:
            v = by_width[d]
            losses = [f"{v.get('loss', math.nan):.3f}", f"{v.get('eval_loss', math.nan):.3f}"]
            cells = losses if scheme != "init" else ["", ""]
            cells += [f"{v.get(f'sigma_max_mean/{k}', math.nan):.3f}" for k in kinds]
            cells += [f"{v[f'gain_mean/{k}']:.3f}" if f"gain_mean/{k}" in v else "" for k in ("attn", "mlp")]
            lines.append(f"| {LABELS[scheme]} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "Slope of log σ_max against log d (least squares over the widths; σ_max averaged per module type, "
              "types weighted equally):", "", "| scheme | attention (q,k,v,o) | MLP (gate,up,down) | all hidden | "
              "lm_head | predicted (hidden, steady state) |", "|---|---:|---:|---:|---:|---|"]
    for scheme, by_width in results.items():
        cells = [f"{slope(widths, [sigma_of(by_width[d], KIND_SETS[s]) for d in widths]):.2f}"
                 for s in ("attn", "mlp", "hidden", "head")]
        lines.append(f"| {LABELS[scheme]} | " + " | ".join(cells) + f" | {PREDICTED_SLOPE[scheme]} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict[str, dict[int, dict[str, float]]], widths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, (loss_ax, sigma_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for scheme, by_width in results.items():
        style = {"linestyle": "--", "color": "grey"} if scheme == "init" else {"marker": "o"}
        sigma_ax.plot(widths, [sigma_of(by_width[d], HIDDEN_KINDS) for d in widths], label=LABELS[scheme], **style)
        if scheme != "init":
            losses = [by_width[d].get("eval_loss", math.nan) for d in widths]
            loss_ax.plot(widths, losses, label=LABELS[scheme], **style)
    loss_ax.set(xscale="log", xlabel="width d (hidden size)", ylabel="final eval loss", title="loss vs width")
    sigma_ax.set(xscale="log", yscale="log", xlabel="width d (hidden size)", ylabel="mean top singular value",
                 title="σ_max of the hidden matrices vs width")
    for ax in (loss_ax, sigma_ax):
        ax.set_xticks(widths, [str(d) for d in widths])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sigma_ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    sigma_ax.yaxis.set_major_formatter(ScalarFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    os.chdir(REPO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    configs = {d: write_model_config(out_dir, d, args) for d in args.widths}
    results: dict[str, dict[int, dict[str, float]]] = {"init": {d: init_values(configs[d], args.seed)
                                                                for d in args.widths}}
    start = time.perf_counter()
    for scheme in args.schemes:
        results[scheme] = {}
        for d in args.widths:
            run_dir = out_dir / "runs" / f"{scheme}_d{d}"
            began = time.perf_counter()
            train(run_flags(scheme, configs[d], run_dir, args, extra), run_dir, args.keep_checkpoints)
            results[scheme][d] = final_values(run_dir)
            final = results[scheme][d]
            print(f"{scheme:>8} d={d:<5} train loss {final.get('loss', math.nan):.3f}  eval loss "
                  f"{final.get('eval_loss', math.nan):.3f}  σ_max(hidden) {sigma_of(final, HIDDEN_KINDS):.3f}  "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
    header = (f"Width transfer, {args.layers} layers, head_dim {args.head_dim}, {args.steps} updates of "
              f"{args.batch_size} x {args.max_length} tokens, AdamW lr {args.lr:g}, weight decay "
              f"{args.weight_decay:g} (proxy d = {min(args.widths)}), {args.scheduler} schedule, seed {args.seed}, "
              f"{args.dataset}" + (f", extra flags: {' '.join(extra)}" if extra else "")
              + f". Training time {time.perf_counter() - start:.0f} s.")
    write_table(results, args.widths, out_dir / "table.md", header)
    plot(results, args.widths, out_dir / "width_transfer.png")
    (out_dir / "results.json").write_text(json.dumps({s: {str(d): v for d, v in r.items()} for s, r in results.items()},
                                                     indent=1) + "\n")
    print(f"wrote {out_dir / 'table.md'}, {out_dir / 'width_transfer.png'} and {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
