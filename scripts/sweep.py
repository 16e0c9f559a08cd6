#!/usr/bin/env python3
"""Run the grid of one of the AlphaDecay paper's tables, one run after another, through scripts/train.sh.

    scripts/sweep.py --table adam  [--sizes 60m,130m] [--methods uniform,alphadecay] [--seeds 5,6,7] [--wds 1e-5]
    scripts/sweep.py --table adamw [...] [-- extra torchrun_main.py flags for every run]

Grids (every size x weight decay x method x seed, plus a WD 0 reference run as Uniform):
    adam    sizes 60m, 130m, 350m, 1b   WD 1e-5, 5e-6, 1e-6   (the paper's main table)
    adamw   sizes 60m, 130m             WD 0.1, 0.05, 0.01
Methods default to all four (uniform, awd, adadecay, alphadecay); WD 0 runs as Uniform only (with no decay
the methods coincide, and AWD is undefined). Seeds default to 5,6,7; the official Adam scripts ran 5..10.

Resumable: a run whose directory already holds its final evaluation is skipped, one with a checkpoint is
resumed from it (--continue_from), anything else starts from scratch; so rerunning the same command after an
interruption or a failure picks up where it stopped. A failed run does not stop the sweep; the failures are
listed at the end and the exit status is 1.

train.sh's environment applies to every run (NGPU, BATCH_SIZE, DATASET, TOKENIZER, RUNS_DIR, ...; SEED is set
per run, RUN_NAME must be unset). Extra flags that change what a run computes leave the run names unchanged,
so give such a sweep its own RUNS_DIR. DRY_RUN=1 prints each command instead of running it. Then tabulate with
`scripts/make_tables.py runs`. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from make_tables import is_run_dir, load_run  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.sh"
METHODS = ("uniform", "awd", "adadecay", "alphadecay")
SIZES = ("60m", "130m", "350m", "1b")
TABLES = {
    "adam": {"sizes": ("60m", "130m", "350m", "1b"), "wds": ("1e-5", "5e-6", "1e-6")},
    "adamw": {"sizes": ("60m", "130m"), "wds": ("0.1", "0.05", "0.01")},
}


def comma_list(choices: tuple[str, ...] | None = None):
    """argparse type: 'a,b' -> ['a', 'b'], each checked against choices when given."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if choices is not None and item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices or ())}, "
                                             f"got {text!r}")
        return items

    return parse


def numbers(text: str) -> list[str]:
    """'1e-5,5e-6' -> ['1e-5', '5e-6'] (kept as written: they name the run directories)."""
    items = comma_list()(text)
    for item in items:
        try:
            float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
    return items


def grid(table: str, sizes: list[str], methods: list[str], seeds: list[str], wds: list[str]) -> list[tuple]:
    """(method, optimizer, size, wd, seed) in run order: small models first, then seed, then decay."""
    runs = []
    for size in sizes:
        for seed in seeds:
            for wd in wds:
                for method in methods:
                    if float(wd) == 0 and method != "uniform":
                        continue
                    runs.append((method, table, size, wd, seed))
    return runs


def train_sh(args: list[str], seed: str, *, dry_run: bool, capture: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEED": seed, "DRY_RUN": "1" if dry_run else "0"}
    return subprocess.run([str(TRAIN), *args], env=env, text=True, capture_output=capture)


def run_dir_of(args: list[str], seed: str) -> Path:
    """The --save_dir train.sh would use (the last one, as the trainer takes the last value of a flag)."""
    result = train_sh(args, seed, dry_run=True, capture=True)
    if result.returncode:
        raise SystemExit(result.stderr.strip() or f"scripts/train.sh {' '.join(args)} failed")
    words = shlex.split(result.stdout)
    save_dir = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--save_dir"][-1]
    return REPO / save_dir  # train.sh runs from the repository root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Everything after -- is passed to every run (e.g. -- --dataset_config en).")
    parser.add_argument("--table", required=True, choices=sorted(TABLES), help="which table's grid to run")
    parser.add_argument("--sizes", type=comma_list(SIZES), help="subset of sizes (default: the table's)")
    parser.add_argument("--methods", type=comma_list(METHODS), default=list(METHODS), help="default: all four")
    parser.add_argument("--seeds", type=comma_list(), default=["5", "6", "7"], help="default: 5,6,7")
    parser.add_argument("--wds", type=numbers,
                        help="weight decays (default: the table's, plus 0 for Uniform); 0 runs as Uniform only")
    args = parser.parse_args(own)
    if not all(seed.isdigit() for seed in args.seeds):
        parser.error(f"--seeds must be non-negative integers, got {','.join(args.seeds)}")
    if os.environ.get("RUN_NAME"):
        parser.error("RUN_NAME is set, which would give every run the same directory; unset it "
                     "(use RUNS_DIR to keep a sweep with changed settings apart)")
    table = TABLES[args.table]
    wds = args.wds or ["0", *table["wds"]]
    runs = grid(args.table, args.sizes or list(table["sizes"]), args.methods, args.seeds, wds)
    dry_run = os.environ.get("DRY_RUN") == "1"

    failed, skipped = [], 0
    try:
        for index, (method, optimizer, size, wd, seed) in enumerate(runs, 1):
            run_args = [method, optimizer, size, wd, *extra]
            run_dir = run_dir_of(run_args, seed)
            label = f"[{index}/{len(runs)}] {method} {optimizer} {size} WD {wd} seed {seed}"
            if is_run_dir(run_dir) and load_run(str(run_dir)).finished:
                print(f"{label}: finished in {run_dir}; skipped", file=sys.stderr, flush=True)
                skipped += 1
                continue
            if any(path.is_dir() for path in run_dir.glob("model_*")):
                run_args += ["--continue_from", str(run_dir)]
                print(f"{label}: resuming from the latest checkpoint in {run_dir}", file=sys.stderr, flush=True)
            else:
                print(label, file=sys.stderr, flush=True)
            if train_sh(run_args, seed, dry_run=dry_run).returncode:
                failed.append(label)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    verb = "listed" if dry_run else "ran"
    print(f"{len(runs)} runs: {skipped} already finished, {len(runs) - skipped - len(failed)} {verb}, "
          f"{len(failed)} failed", file=sys.stderr)
    for label in failed:
        print(f"  failed: {label}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
