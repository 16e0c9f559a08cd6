#!/usr/bin/env python3
"""Markdown tables of final validation perplexity from finished runs, laid out like the AlphaDecay paper's.

    scripts/make_tables.py RUN_DIR_OR_GLOB... [--out tables.md] [--official] [--allow_mixed]

Each argument is a run directory (holding config.json and metrics.jsonl), a directory searched for run
directories (e.g. `runs`), or a quoted glob (`'runs/*-130M-*'`). One table per optimizer (Adam, AdamW); rows
are the methods (Uniform, AWD, AdaDecay, AlphaDecay, then any other registered method or combination), columns
are model size x base weight decay, with WD 0 (no decay) as its own column. A cell is the mean ± sample standard
deviation (n - 1) over the runs in it (normally seeds), with n; a single run shows its value alone. The lowest mean
of each column with two or more entries is in bold.

A run's value is its last evaluation, which must be at its final update (runs still training, or stopped early,
are left out and listed on stderr). Runs averaged in one cell must agree in their provenance, what changes the
numbers without being a hyperparameter (alphadecay.config.PROVENANCE_KEYS: world size, micro-batch,
accumulation, resolved dtype and optimizer kernel, evaluation layout, torch and transformers versions, from
config.json and every start's `provenance` event in metrics.jsonl): otherwise the script exits with code 2,
naming the field and the runs, unless --allow_mixed, which averages them and marks the cell with †. Runs that
differ in other settings are averaged with a warning. `eval_ppl` is the token-weighted perplexity; `--official` uses
`eval_ppl_official`, the official code's estimator (biased low, ~3% at the paper's 10M evaluation tokens),
which is what the paper reports. Standard library only (plus this repository's alphadecay.config and alphadecay.metrics, which are
standard library too).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alphadecay.config import PROVENANCE_KEYS, TrainConfig  # noqa: E402  (needs the repository root on sys.path)
from alphadecay.metrics import read_metrics  # noqa: E402

METHOD_LABELS = {"uniform": "Uniform", "awd": "AWD", "adadecay": "AdaDecay", "alphadecay": "AlphaDecay",
                 "adamc": "AdamC", "independent": "Independent", "cautious": "Cautious", "swd": "SWD"}


def method_label(name: str) -> str:
    """'AlphaDecay + Cautious' for alphadecay+cautious; any other name as it is."""
    return " + ".join(METHOD_LABELS.get(part, part) for part in name.split("+"))


def method_order(name: str) -> tuple:
    """The paper's four, then the newer methods, then the combinations, each in the registry's order."""
    parts = name.split("+")
    return (len(parts), [list(METHOD_LABELS).index(p) if p in METHOD_LABELS else len(METHOD_LABELS) for p in parts],
            name)
OPTIMIZER_LABELS = {"adam": "Adam", "adamw": "AdamW"}
# Flags that do not change what a run computes; runs sharing a cell may differ in these (and in seed). The
# micro-batch and accumulation are compared through the provenance instead (PROVENANCE_KEYS).
LOGISTICS = {"seed", "save_dir", "wandb_name", "wandb_mode", "wandb_project", "tags", "name", "continue_from",
             "workers", "batch_size", "gradient_accumulation", "device", "log_every", "save_every", "single_cuda"}


@dataclasses.dataclass(frozen=True)
class Run:
    path: str
    config: TrainConfig
    last_eval: dict | None  # the last evaluation event of metrics.jsonl
    provenance: dict  # PROVENANCE_KEYS -> the distinct values the run recorded, in order (one per segment at most)

    @property
    def finished(self) -> bool:
        """Its last evaluation is at the final update."""
        return self.last_eval is not None and self.last_eval["step"] >= self.config.train_steps()

    @property
    def size(self) -> str:
        return size_label(self.config.model_config)


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "metrics.jsonl"))


def load_run(path: str) -> Run:
    """A run directory's configuration and last evaluation event."""
    with open(os.path.join(path, "config.json")) as fh:
        saved = json.load(fh)
    config = TrainConfig.from_saved(saved)
    last_eval = None
    recorded = []
    for event in read_metrics(path):  # a run still writing its last line is read up to it
        if "eval_ppl" in event:
            last_eval = event
        if "provenance" in event:
            recorded.append(event["provenance"])
    recorded = recorded or [saved.get("provenance") or {}]  # runs from before provenance events: config.json's
    provenance = {key: tuple(dict.fromkeys(json.dumps(p.get(key)) for p in recorded)) for key in PROVENANCE_KEYS}
    return Run(path, config, last_eval, provenance)


def find_run_dirs(arguments: list[str]) -> list[str]:
    """Run directories named by the arguments (directories, searched recursively, or globs), each once."""
    found: dict[str, None] = {}
    for argument in arguments:
        matches = sorted(glob.glob(argument)) or [argument]
        for match in matches:
            if not os.path.isdir(match):
                print(f"note: {match} is not a directory; skipped", file=sys.stderr)
                continue
            for root, dirs, _ in os.walk(match):
                dirs.sort()
                if is_run_dir(root):
                    found.setdefault(os.path.realpath(root))
                    dirs.clear()  # its model_<step>/ checkpoints hold a (model) config.json too
    return list(found)


def size_label(model_config: str) -> str:
    """configs/llama_130m.json -> 130M."""
    stem = Path(model_config).stem
    match = re.fullmatch(r"llama_(\d+(?:\.\d+)?)([mb])", stem)
    return f"{match.group(1)}{match.group(2).upper()}" if match else stem


def size_order(label: str) -> tuple[float, str]:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([MB])", label)
    return (float(match.group(1)) * (1e3 if match.group(2) == "B" else 1.0), label) if match else (math.inf, label)


def format_wd(wd: float) -> str:
    """1e-05 -> 1e-5, 0.1 -> 0.1, 0.0 -> 0."""
    return re.sub(r"e([-+])0*(\d)", r"e\1\2", f"{wd:g}")


def format_cell(values: list[float], bold: bool, mixed: bool = False) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {statistics.stdev(values):.2f}"
    text = f"**{text}**" if bold else text
    return f"{text} (n={len(values)}){' †' if mixed else ''}"


def make_table(optimizer: str, cells: dict[tuple[str, float, str], list[float]],
               mixed: set[tuple[str, float, str]] = frozenset()) -> str:
    """One optimizer's table; cells maps (size, wd, method) to the runs' perplexities; `mixed` cells get a †."""
    columns = sorted({(size, wd) for size, wd, _ in cells}, key=lambda c: (size_order(c[0]), c[1] != 0, -c[1]))
    methods = sorted({method for _, _, method in cells}, key=method_order)
    best: dict[tuple[str, float], float] = {}
    for column in columns:
        means = [round(statistics.fmean(cells[(*column, m)]), 2) for m in methods if (*column, m) in cells]
        if len(means) >= 2:
            best[column] = min(means)
    lines = [f"## {OPTIMIZER_LABELS.get(optimizer, optimizer)}", "",
             "| Method | " + " | ".join(f"{size}, WD {format_wd(wd)}" for size, wd in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method in methods:
        row = []
        for column in columns:
            values = cells.get((*column, method))
            row.append(format_cell(values, best.get(column) == round(statistics.fmean(values), 2),
                                   (*column, method) in mixed) if values else "–")
        lines.append(f"| {method_label(method)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


class MixedProvenance(Exception):
    """Runs of one cell differ in their provenance (the message names the fields and the runs)."""


def make_tables(runs: list[Run], official: bool = False, allow_mixed: bool = False) -> str:
    """Markdown for finished runs (unfinished ones and cells that mix settings are reported on stderr).

    Raises MixedProvenance when the runs of a cell differ in provenance, unless allow_mixed (then the cell is
    marked with † and the fields are reported on stderr)."""
    key = "eval_ppl_official" if official else "eval_ppl"
    groups: dict[tuple[str, str, float, str], list[Run]] = defaultdict(list)
    for run in runs:
        if not run.finished:
            step = run.last_eval["step"] if run.last_eval else "none"
            print(f"note: {run.path} is not finished (last evaluation at update {step} of "
                  f"{run.config.train_steps()}); left out", file=sys.stderr)
            continue
        config = run.config
        groups[(config.optimizer, run.size, config.weight_decay, config.wd_method())].append(run)

    tables: dict[str, dict[tuple[str, float, str], list[float]]] = defaultdict(dict)
    mixed_cells: dict[str, set[tuple[str, float, str]]] = defaultdict(set)
    for (optimizer, size, wd, method), members in sorted(groups.items()):
        differing = provenance_differences(members)
        if differing:
            cell = f"{OPTIMIZER_LABELS.get(optimizer, optimizer)} {size} WD {format_wd(wd)} {method_label(method)}"
            detail = "; ".join(f"{k} ({v})" for k, v in differing.items())
            if not allow_mixed:
                raise MixedProvenance(f"the runs of cell {cell} differ in {detail}. Their numbers are not comparable: "
                                      f"re-run them alike, or pass --allow_mixed to average them anyway (the cell "
                                      f"is then marked †).")
            print(f"warning: cell {cell} averages runs that differ in {detail}", file=sys.stderr)
            mixed_cells[optimizer].add((size, wd, method))
        warn_if_mixed(members)
        tables[optimizer][(size, wd, method)] = [run.last_eval[key] for run in members]
    if not tables:
        return "No finished runs.\n"
    estimator = ("`eval_ppl_official`: the official code's estimator, biased low (~3% at 10M evaluation tokens), "
                 "comparable with the paper" if official else "`eval_ppl`: token-weighted")
    blocks = [make_table(optimizer, tables[optimizer], mixed_cells[optimizer]) for optimizer in sorted(tables)]
    legend = (f"Final validation perplexity ({estimator}): mean ± sample standard deviation over runs (seeds), "
              "n = number of runs; the lowest mean in each column is in bold.")
    if any(mixed_cells.values()):
        legend += (" † averages runs that differ in provenance (world size, micro-batch, dtype, optimizer kernel, "
                   "evaluation layout or library versions; see stderr).")
    return "\n\n".join(blocks) + "\n\n" + legend + "\n"


def provenance_differences(members: list[Run]) -> dict[str, str]:
    """Each PROVENANCE_KEYS field in which the runs differ (or one run's segments do), with every run's values."""
    out = {}
    for key in PROVENANCE_KEYS:
        values = [run.provenance.get(key, ("null",)) for run in members]
        if len(set(values)) > 1 or any(len(v) > 1 for v in values):
            out[key] = ", ".join(f"{run.path}: {' then '.join('unrecorded' if x == 'null' else x for x in v)}"
                                 for run, v in zip(members, values))
    return out


def warn_if_mixed(members: list[Run]) -> None:
    """Runs averaged together should differ only in seed and logistics."""
    settings = [{k: v for k, v in dataclasses.asdict(r.config).items() if k not in LOGISTICS} for r in members]
    differing = sorted(k for k in settings[0] if any(s[k] != settings[0][k] for s in settings))
    if differing:
        print(f"warning: runs averaged in one cell differ in {', '.join(differing)}: "
              f"{', '.join(r.path for r in members)}", file=sys.stderr)
    seeds = [r.config.seed for r in members]
    if len(set(seeds)) < len(seeds):
        print(f"warning: repeated seeds {sorted(seeds)} in one cell: {', '.join(r.path for r in members)}",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB")
    parser.add_argument("--out", help="also write the markdown to this file")
    parser.add_argument("--official", action="store_true",
                        help="use eval_ppl_official (the official estimator, as in the paper) instead of eval_ppl")
    parser.add_argument("--allow_mixed", action="store_true",
                        help="average runs of one cell that differ in provenance (marked †) instead of refusing")
    args = parser.parse_args(argv)
    run_dirs = find_run_dirs(args.runs)
    if not run_dirs:
        print(f"error: no run directories (config.json + metrics.jsonl) under {' '.join(args.runs)}",
              file=sys.stderr)
        return 2
    try:
        markdown = make_tables([load_run(path) for path in run_dirs], official=args.official,
                               allow_mixed=args.allow_mixed)
    except MixedProvenance as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    if args.out:
        Path(args.out).write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
