#!/usr/bin/env python3
"""Every weight-decay method side by side on the same model, data and evaluation, several seeds each.

    scripts/compare_methods.py                          # the CPU default: `make demo`'s model and data, ~1 h on 2 cores
    scripts/compare_methods.py --steps 4 --sweep_seed 9 --seeds 10 --out_dir runs/methods_check   # a quick check
    scripts/compare_methods.py --methods uniform,cautious -- --device cuda   # flags after `--` go to every run

Two stages, each a list of `torchrun_main.py` runs (AdamW, the same schedule everywhere; --jobs of them at a time,
each in its own process with one thread; a run already finished in --runs_dir is not run again):
1. the sweep: every method at each decay of its grid (DECAY_GRIDS: three values on the scale the method expects,
   the README's table), one seed (--sweep_seed); each method's decay is the one with the lowest final evaluation
   perplexity (token mean);
2. the comparison: every method at its chosen decay with each of --seeds, seeds the sweep did not use (the seed
   sets both the initialisation and the data order: --seed and --data_seed).
DRY_RUN=1 prints the runs' commands instead (the comparison's at each grid's first decay, standing in for the
sweep's choice). Then writes to --out_dir:
- table.md: per method mean ± sample std over the seeds of the final evaluation perplexity, token mean and the
  official estimator, and of the final training loss; the difference from Uniform, per seed (paired) and whether
  it exceeds the seed spread; the sweep that chose each decay; the exact command;
- perplexity.png: evaluation perplexity against updates, the mean over seeds with a band from the lowest to the
  highest seed, in two panels (the paper's four; the 2023-2025 methods and the combinations, with Uniform in both);
- results.json: every run's final numbers and curve.
A difference "exceeds the seed spread" when the two methods' means differ by more than the larger of their two
seed standard deviations; "consistent" when the method is better (or worse) than Uniform at every seed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER = ("uniform", "awd", "adadecay", "alphadecay")
NEWER = ("adamc", "independent", "cautious", "swd", "alphadecay+adamc", "alphadecay+cautious")
LR = 3e-3  # `make demo`'s peak learning rate
ADAMW_GRID = (0.1, 0.3, 1.0)  # AdamW's decay; at lr 3e-3 the timescale 1/(lr x decay) is 3333, 1111, 333 updates
DECAY_GRIDS = {
    **{name: ADAMW_GRID for name in ("uniform", "adadecay", "alphadecay", "adamc", "cautious", "alphadecay+adamc",
                                     "alphadecay+cautious")},
    # wd / lr_max is AdamW's decay: the same three decays, so independent repeats uniform (a check of the two)
    "independent": tuple(round(d * LR, 10) for d in ADAMW_GRID),
    # AWD applies lambda_bar ~ 100 x wd x ||g|| / ||w||; on this model ||g|| / ||w|| falls from ~0.03 to ~0.006 over
    # the first 30 updates (awd/lambda_t of a probe run), so 100 x ||g|| / ||w|| ~ 1: AdamW's decays again
    "awd": ADAMW_GRID,
    # SWD applies wd / sqrt(v_bar); on this model sqrt(v_bar) falls from ~9e-4 to ~5e-4 over the first 30 updates
    # (swd/sqrt_v_bar of a probe run): AdamW's decays x 5e-4
    "swd": tuple(round(d * 5e-4, 10) for d in ADAMW_GRID),
}
LABELS = {"uniform": "Uniform", "awd": "AWD", "adadecay": "AdaDecay", "alphadecay": "AlphaDecay", "adamc": "AdamC",
          "independent": "Independent", "cautious": "Cautious", "swd": "SWD"}


def label(method: str) -> str:
    return " + ".join(LABELS.get(p, p) for p in method.split("+"))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(PAPER + NEWER),
                        help="methods to compare (registry names; each needs an entry in DECAY_GRIDS or --decays)")
    parser.add_argument("--decays", type=json.loads, default={},
                        help='JSON {method: [decays]} replacing DECAY_GRIDS entries; one decay skips its sweep')
    parser.add_argument("--steps", type=int, default=200, help="updates per run")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: 10%% of --steps")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per update")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--evals", type=int, default=5, help="evaluations per run (the curve's points)")
    parser.add_argument("--eval_tokens", type=int, default=40_000, help="validation tokens per evaluation")
    parser.add_argument("--sweep_seed", type=int, default=0, help="the sweep's seed")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3],
                        help="the comparison's seeds")
    parser.add_argument("--model_config", default="configs/llama_3m.json")
    parser.add_argument("--dataset", default="data/c4_sample")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each one process, one thread)")
    parser.add_argument("--runs_dir", default="runs/methods_cpu", help="where the runs go")
    parser.add_argument("--out_dir", default="docs/methods_cpu", help="where the table, plot and results go")
    given = list(sys.argv[1:] if argv is None else argv)
    argv, extra = given, []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    from alphadecay.wd.registry import names

    unknown = [m for m in args.methods if m not in names()]
    missing = [m for m in args.methods if m not in DECAY_GRIDS and m not in args.decays]
    if unknown or missing:
        parser.error(f"unknown method(s) {unknown} (see alphadecay.wd.registry.names()); no decay grid for "
                     f"{missing} (give --decays)")
    args.command = " ".join(["scripts/compare_methods.py", *(shlex.quote(a) for a in given)])
    return args, extra


def run_flags(method: str, decay: float, seed: int, run_dir: Path, args: argparse.Namespace,
              extra: list[str]) -> list[str]:
    """torchrun_main.py flags of one run."""
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    flags = {"model_config": args.model_config, "dataset": args.dataset, "tokenizer": args.tokenizer,
             "device": "cpu", "dtype": "float32", "optimizer": "adamw", "lr": LR, "scheduler": "cosine",
             "min_lr_ratio": 0.1, "weight_decay": decay, "wd_scheduler": method, "batch_size": args.batch_size,
             "total_batch_size": args.batch_size, "max_length": args.max_length, "num_training_steps": args.steps,
             "warmup_steps": warmup, "eval_every": max(1, args.steps // args.evals), "save_every": args.steps,
             "log_every": 10, "target_eval_tokens": args.eval_tokens, "official_eval_rows": args.batch_size,
             "seed": seed, "data_seed": seed, "wandb_mode": "disabled", "wandb_name": run_dir.name,
             "save_dir": run_dir}
    if "alphadecay" in method or "adadecay" in method:
        flags["unbalancedWD_every"] = max(1, args.steps // 10)  # ten module-wise passes per run
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))] + extra


def run_name(method: str, decay: float, seed: int) -> str:
    return f"{method.replace('+', '_')}-wd{decay:g}-seed{seed}"


def finished(run_dir: Path, steps: int) -> bool:
    from alphadecay.metrics import read_metrics

    if not (run_dir / "metrics.jsonl").exists() or not (run_dir / "wall_seconds").exists():
        return False
    return any(r.get("step") == steps and "eval_ppl" in r for r in read_metrics(str(run_dir)))


def train(flags: list[str], run_dir: Path) -> float:
    """One torchrun_main.py run in its own process (one thread), its output in run_dir/train.log; its seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for checkpoint in run_dir.glob("model_*"):  # an unfinished run of this script: start it again
        subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    for stale in ("metrics.jsonl", "config.json"):
        (run_dir / stale).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        log.write("torchrun_main.py " + " ".join(shlex.quote(f) for f in flags) + "\n")
        log.flush()
        status = subprocess.run([sys.executable, str(REPO / "torchrun_main.py"), *flags], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"run {run_dir} failed (exit status {status}); see {run_dir / 'train.log'}")
    for checkpoint in run_dir.glob("model_*"):
        subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    seconds = time.perf_counter() - start
    (run_dir / "wall_seconds").write_text(f"{seconds:.1f}\n")
    return seconds


def run_all(runs: list[tuple[str, float, int]], args: argparse.Namespace, extra: list[str], stage: str) -> int:
    """Train the runs not finished yet, --jobs at a time (DRY_RUN=1: print their commands); how many it trained."""
    if os.environ.get("DRY_RUN") == "1":
        for method, decay, seed in runs:
            flags = run_flags(method, decay, seed, Path(args.runs_dir) / run_name(method, decay, seed), args, extra)
            print(" ".join(shlex.quote(a) for a in [sys.executable, "torchrun_main.py", *flags]))
        return 0
    todo = [(m, d, s) for m, d, s in runs if not finished(Path(args.runs_dir) / run_name(m, d, s), args.steps)]
    print(f"{stage}: {len(runs)} runs, {len(runs) - len(todo)} already finished", file=sys.stderr, flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for method, decay, seed in todo:
            run_dir = Path(args.runs_dir) / run_name(method, decay, seed)
            futures[pool.submit(train, run_flags(method, decay, seed, run_dir, args, extra), run_dir)] = run_dir
        for future in concurrent.futures.as_completed(futures):
            final = result(futures[future])
            print(f"  {futures[future].name}: eval ppl {final['eval_ppl']:.2f} ({future.result():.0f} s)", flush=True)
    return len(todo)


def result(run_dir: Path) -> dict:
    """A finished run's final numbers and its evaluation curve."""
    from alphadecay.metrics import read_metrics

    records = read_metrics(str(run_dir))
    evals = [r for r in records if "eval_ppl" in r]
    losses = [r for r in records if "loss" in r]
    return {"eval_ppl": evals[-1]["eval_ppl"], "eval_ppl_official": evals[-1]["eval_ppl_official"],
            "eval_loss": evals[-1]["eval_loss"], "train_loss": losses[-1]["loss"],
            "curve": [[r["step"], r["eval_ppl"]] for r in evals],
            "wall_seconds": float((run_dir / "wall_seconds").read_text())}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def write_table(sweep: dict, chosen: dict, results: dict, args: argparse.Namespace, path: Path, wall: str) -> None:
    seeds = args.seeds
    lines = [f"# Weight-decay methods compared on CPU ({len(seeds)} seeds)", "",
             f"`make demo`'s model ({args.model_config}, 2.85M parameters) and data ({args.dataset}), AdamW, lr {LR:g} "
             f"(cosine to 0.1x after {args.warmup_steps or max(1, args.steps // 10)} warmup updates), {args.steps} "
             f"updates of {args.batch_size} x {args.max_length} tokens, float32, one process. Evaluation on the first "
             f"{args.eval_tokens:,} validation tokens. Seeds {', '.join(map(str, seeds))} (initialisation and data "
             f"order); each method at the decay its sweep chose (seed {args.sweep_seed}, below).", "", wall, "",
             "**A CPU toy.** A 2.85M-parameter model trained for a few hundred updates on a 3 MB sample is far from "
             "the regime these methods were designed for (LLM pretraining at 60M-1B parameters over billions of "
             "tokens): the table shows that each method runs and what it does to a small model in a short run, not "
             "how the methods rank at scale.", "",
             "| method | decay | eval ppl (token mean) | eval ppl (official estimator) | final train loss | "
             "Δ ppl vs Uniform, per seed | mean Δ ± std | exceeds the seed spread? | same sign at every seed? |",
             "|---|---:|---:|---:|---:|---|---:|---|---|"]
    base = [results[("uniform", s)]["eval_ppl"] for s in seeds] if "uniform" in chosen else None
    base_ms = mean_std(base) if base else None
    verdicts = {}
    for method in chosen:
        ppl = [results[(method, s)]["eval_ppl"] for s in seeds]
        official = [results[(method, s)]["eval_ppl_official"] for s in seeds]
        loss = [results[(method, s)]["train_loss"] for s in seeds]
        (m, sd), (mo, so), (ml, sl) = mean_std(ppl), mean_std(official), mean_std(loss)
        cells = ["", "", "", ""]
        if base and method != "uniform":
            deltas = [p - b for p, b in zip(ppl, base)]
            exceeds = abs(m - base_ms[0]) > max(sd, base_ms[1])
            consistent = all(d < 0 for d in deltas) or all(d > 0 for d in deltas)
            cells = [", ".join(f"{d:+.2f}" for d in deltas), "{:+.2f} ± {:.2f}".format(*mean_std(deltas)),
                     "yes" if exceeds else "no", "yes" if consistent else "no"]
            verdicts[method] = (m - base_ms[0], exceeds, consistent)
        lines.append(f"| {label(method)} | {chosen[method]:g} | {m:.2f} ± {sd:.2f} | {mo:.2f} ± {so:.2f} | "
                     f"{ml:.4f} ± {sl:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over the seeds. Δ: the method's perplexity minus Uniform's at the "
              "same seed (same initialisation and data order). A difference *exceeds the seed spread* when the two "
              "means differ by more than the larger of the two methods' standard deviations over the seeds; the "
              "paired view (Δ per seed, and whether it has the same sign at every seed) removes the part of that "
              "spread the seed causes in both methods alike.", ""]
    if verdicts:
        def names(keep):
            return ", ".join(f"{label(m)} ({d:+.2f})" for m, (d, exceeds, same) in verdicts.items()
                             if keep(exceeds, same)) or "none"

        lines += [f"Differences from Uniform that exceed the seed spread: {names(lambda e, c: e)}. Within the seed "
                  f"spread but of the same sign at every seed: {names(lambda e, c: not e and c)}. Within it and of "
                  f"mixed signs: {names(lambda e, c: not e and not c)}.", ""]
    lines += ["## The sweep that chose each decay", "",
              f"Seed {args.sweep_seed}, otherwise the runs above; final evaluation perplexity (token mean); the chosen "
              "decay (lowest) in bold. Each grid is three values on the scale the method expects (README, the "
              "table of methods): AdamW's decay for uniform, adadecay, alphadecay, adamc, cautious and the "
              f"combinations; for independent the same decays x lr_max ({LR:g}), so its runs repeat Uniform's; "
              "AWD's and SWD's from the gradient statistic they scale by on this model.", "",
              "| method | decays → eval ppl | Δ vs Uniform: the sweep's seed | the comparison's seeds (mean) |",
              "|---|---|---:|---:|"]
    edges = []
    for method, by_decay in sweep.items():
        cells = [(f"**{d:g} → {p:.2f}**" if d == chosen[method] else f"{d:g} → {p:.2f}") for d, p in by_decay.items()]
        deltas = ["", ""]
        if "uniform" in sweep and method != "uniform":
            deltas = [f"{by_decay[chosen[method]] - sweep['uniform'][chosen['uniform']]:+.2f}",
                      f"{verdicts[method][0]:+.2f}" if method in verdicts else ""]
        lines.append(f"| {label(method)} | " + ", ".join(cells) + " | " + " | ".join(deltas) + " |")
        if chosen[method] in (min(by_decay), max(by_decay)):
            edges.append(f"{label(method)} ({'smallest' if chosen[method] == min(by_decay) else 'largest'})")
    if edges:
        lines += ["", f"The chosen decay is at an edge of its grid for {', '.join(edges)}: the sweep did not bracket "
                  "a best decay there, so a decay beyond the grid may do better."]
    lines += ["", "## The command", "", "```bash", args.command, "```", ""]
    path.write_text("\n".join(lines))


def plot(chosen: dict, results: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("the paper's four", [m for m in chosen if m in PAPER]),
              ("2023-2025 methods and combinations (Uniform for reference)",
               [m for m in chosen if m == "uniform" or m not in PAPER])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, methods) in zip(axes, panels):
        for i, method in enumerate(methods):
            curves = [results[(method, s)]["curve"] for s in seeds]
            steps = [step for step, _ in curves[0]]
            values = [[ppl for _, ppl in c] for c in curves]
            mean = [statistics.fmean(v) for v in zip(*values)]
            color = "black" if method == "uniform" else colors[i % len(colors)]
            ax.plot(steps, mean, marker="o", markersize=3, color=color,
                    label=f"{label(method)} (wd {chosen[method]:g})")
            ax.fill_between(steps, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)], color=color,
                            alpha=0.15)
        ax.set(yscale="log", xlabel="update", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"evaluation perplexity (mean over {len(seeds)} seeds; band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    os.chdir(REPO)
    start, load_before = time.perf_counter(), os.getloadavg()[1]
    grids = {m: tuple(args.decays.get(m, DECAY_GRIDS.get(m, ()))) for m in args.methods}
    sweep_runs = [(m, d, args.sweep_seed) for m in args.methods if len(grids[m]) > 1 for d in grids[m]]
    trained = run_all(sweep_runs, args, extra, "sweep")
    if os.environ.get("DRY_RUN") == "1":
        run_all([(m, grids[m][0], s) for m in args.methods for s in args.seeds], args, extra, "comparison")
        return 0
    sweep = {m: {d: result(Path(args.runs_dir) / run_name(m, d, args.sweep_seed))["eval_ppl"] for d in grids[m]}
             for m in args.methods if len(grids[m]) > 1}
    chosen = {m: (min(sweep[m], key=sweep[m].get) if m in sweep else grids[m][0]) for m in args.methods}
    print("chosen decays: " + ", ".join(f"{m} {d:g}" for m, d in chosen.items()), flush=True)
    trained += run_all([(m, chosen[m], s) for m in args.methods for s in args.seeds], args, extra, "comparison")
    results = {(m, s): result(Path(args.runs_dir) / run_name(m, chosen[m], s)) for m in args.methods
               for s in args.seeds}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter() - start
    runs_seconds = sum(float((Path(args.runs_dir) / run_name(m, d, s) / "wall_seconds").read_text())
                       for m, d, s in sweep_runs + [(m, chosen[m], s) for m in args.methods for s in args.seeds])
    timing = (f"Time: {runs_seconds / 60:.0f} min of runs ({len(set(sweep_runs)) + len(results)} runs, {args.jobs} at "
              f"a time), {wall / 60:.0f} min of wall time for the invocation that trained them, on {os.cpu_count()} "
              f"cores with a 5-min load average of {load_before:.1f} at its start and {os.getloadavg()[1]:.1f} at its "
              "end (other processes shared the machine when it exceeded the jobs).")
    earlier = re.search(r"^Time: .*$", (out / "table.md").read_text(), re.M) if (out / "table.md").exists() else None
    if not trained and earlier:  # nothing trained now: the time is that of the invocation that trained the runs
        timing = earlier.group(0)
    write_table(sweep, chosen, results, args, out / "table.md", timing)
    plot(chosen, results, args.seeds, out / "perplexity.png")
    (out / "results.json").write_text(json.dumps(
        {"command": args.command, "chosen": chosen, "sweep": {m: {str(d): p for d, p in v.items()} for m, v in
                                                              sweep.items()},
         "runs": {f"{m} seed {s}": r for (m, s), r in results.items()}}, indent=1) + "\n")
    print(f"wrote {out / 'table.md'}, {out / 'perplexity.png'} and {out / 'results.json'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
