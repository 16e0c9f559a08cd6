"""Figures of spectra and of training runs, drawn with matplotlib (Agg backend, small PNGs).

`python -m alphadecay.plot RUN_DIR [RUN_DIR ...] --out DIR` reads each run's metrics.jsonl (config.json, when
present, gives the labels and the base decay) and writes to DIR:
- `<run>_alpha_heatmap.png`: alpha of each tuned module (rows in model order) at each module-wise pass;
- `<run>_decay_multiplier_heatmap.png`: each module's decay multiplier, wd/<module> divided by the base decay
  (`--weight_decay`, times the scaling rule's factor for matrices), at each pass;
- `<run>_type_means.png`: mean alpha and mean decay multiplier per module type (q, k, v, o, gate, up, down);
- `loss_and_eval_ppl.png`: training loss and evaluation perplexity against updates, the runs overlaid and
  labelled by method, optimizer and decay (the comparison a paper figure makes).
A run without alpha (AdaDecay drives its decays by gradient norms) gets the heatmap of its logged metric instead
(`<run>_gradnorm_heatmap.png`); a run without any module-wise pass (Uniform, AWD) gets a note instead of the
per-module figures. A run that is still going is read as far as it is written (a half-written last line is
skipped). Pass steps are the `step` of the event, i.e. updates completed: the pass at initialisation shows as 1.

`alphadecay.esd.report --plot` uses `esd_figure` and `overview_figure` for one model's spectra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from alphadecay.errors import UserError
from alphadecay.wd.groups import ATTENTION_KINDS, layer_index, module_kind

DPI = 100
# LLaMA's kinds, then the fused ones of GPT-2, GPT-NeoX and the ViT (qkv, proj, fc1, fc2: wd.groups.MODULE_KINDS)
KINDS = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "proj", "fc1", "fc2", "head")
# attention in cool colours, MLP in warm ones: the split AlphaDecay's paper (and FARMS) is about
KIND_COLORS = {"q": "#1f77b4", "k": "#17becf", "v": "#9467bd", "o": "#2ca02c", "gate": "#ff7f0e", "up": "#d62728",
               "down": "#8c564b", "qkv": "#1f77b4", "proj": "#2ca02c", "fc1": "#d62728", "fc2": "#8c564b",
               "head": "#7f7f7f", "linear": "#bcbd22"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_name(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `3 up`; `lm_head` -> `head`."""
    layer = layer_index(name)
    return f"{layer} {module_kind(name)}" if layer is not None else module_kind(name)


def save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# one model: ESD of a module, alpha and decay per module
# ---------------------------------------------------------------------------------------------------------------
def esd_figure(name: str, eigs: np.ndarray, *, alpha: float, d: float, xmin: float, n_tail: int, fit: str,
               estimator: str = "full", bins: int | None = None):
    """Log-log ESD of one module: histogram density of the eigenvalues on log-spaced bins, and the fitted power
    law p(λ) = (n_tail/N)·(α−1)/xmin·(λ/xmin)^(−α) from xmin on (a line of slope −α: the tail's share of
    the density, so that it lies on the histogram).

    The smallest 1% of the eigenvalues are left out of the picture (not of the density's normalisation): square
    matrices, FARMS' square windows included, have eigenvalues down to ~1e-8·λ_max whose few sparse bins would
    otherwise stretch the axes over decades that carry no information about the tail."""
    plt = _pyplot()
    eigs = np.sort(np.asarray(eigs, dtype=np.float64))
    positive = eigs[eigs > 0]
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    low = np.quantile(positive, 0.01) if len(positive) >= 200 else (positive[0] if len(positive) else 0.0)
    if len(positive) >= 2 and positive[-1] > low:
        shown = positive[positive >= low]
        bins = bins or int(np.clip(2 * np.sqrt(len(shown)), 10, 80))
        edges = np.logspace(np.log10(low), np.log10(positive[-1]), bins + 1)
        density, _ = np.histogram(shown, bins=edges)
        density = density / (len(eigs) * np.diff(edges))
        hidden = f"; smallest {len(eigs) - len(shown)} not shown" if len(shown) < len(eigs) else ""
        ax.stairs(np.where(density > 0, density, np.nan), edges, fill=True, color=KIND_COLORS[module_kind(name)],
                  alpha=0.55, label=f"ESD ({len(eigs)} eigenvalues{hidden})")
    if math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0 and len(positive):
        grid = np.logspace(np.log10(xmin), np.log10(positive[-1]), 50)
        line = n_tail / len(eigs) * (alpha - 1) / xmin * (grid / xmin) ** (-alpha)
        ax.plot(grid, line, color="black", lw=1.6, label=f"power law, slope −{alpha:.2f}")
        ax.axvline(xmin, color="black", ls=":", lw=1, label=f"xmin (tail: {n_tail} values)")
    ax.set(xscale="log", yscale="log", xlabel="eigenvalue λ of WᵀW", ylabel="density")
    source = "FARMS windows" if estimator == "farms" else "whole matrix"
    ax.set_title(f"{name} ({source})\nalpha {alpha:.3f}   D {d:.3f}   xmin {xmin:.3g}   ({fit} fit)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.25, which="both", lw=0.5)
    fig.tight_layout()
    return fig


def overview_figure(rows: list[dict], *, base_decay: float, title: str):
    """Alpha of every Linear in model order, coloured by type, and on a second axis the decay multiplier
    AlphaDecay would assign (rows: {"name", "alpha", "weight_decay"}, weight_decay None where not tuned)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.11 * len(rows) + 2.5), 3.9))
    x = np.arange(len(rows))
    kinds = [module_kind(r["name"]) for r in rows]
    ax.scatter(x, [r["alpha"] for r in rows], c=[KIND_COLORS[k] for k in kinds], s=30, zorder=3)
    ax.grid(axis="y", alpha=0.3)
    ax.set(ylabel="alpha (lower = heavier tail)", xlim=(-0.7, len(rows) - 0.3))
    # the y range of the tuned modules: an untuned outlier (lm_head's alpha is ~10 at init) is clipped and labelled
    scale = [r["alpha"] for r in rows if math.isfinite(r["alpha"]) and r["weight_decay"] is not None] or \
        [r["alpha"] for r in rows if math.isfinite(r["alpha"])]
    if scale:
        top = max(scale) + 0.1 * (max(scale) - min(scale)) + 0.05
        ax.set_ylim(max(0.0, min(scale) - 0.3 * (max(scale) - min(scale)) - 0.2), top)
        for i, r in enumerate(rows):
            if math.isfinite(r["alpha"]) and r["alpha"] > top:
                ax.annotate(f"{r['alpha']:.1f} ↑", (i, top), ha="center", va="top", fontsize=7,
                            color=KIND_COLORS[module_kind(r["name"])])
    _layer_ticks(ax, [r["name"] for r in rows])
    twin = ax.twinx()
    tuned = [(i, r["weight_decay"] / base_decay) for i, r in enumerate(rows) if r["weight_decay"] is not None]
    if tuned:
        twin.plot([i for i, _ in tuned], [m for _, m in tuned], "k_", ms=9, mew=2, ls="none")
        twin.set_ylabel("AlphaDecay's decay multiplier (black marks)")
        lo, hi = min(m for _, m in tuned), max(m for _, m in tuned)
        twin.set_ylim(lo - 0.08 * (hi - lo + 1e-9), hi + 0.08 * (hi - lo + 1e-9))
    handles = [plt.Line2D([], [], ls="none", marker="o", color=KIND_COLORS[k]) for k in KINDS if k in kinds]
    ax.legend(handles, [k for k in KINDS if k in kinds], ncol=8, fontsize=7, loc="upper left", framealpha=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _layer_ticks(ax, names: list[str]) -> None:
    """One tick per block (at its first module) when there are many modules, else one per module."""
    if len(names) <= 32:
        ax.set_xticks(range(len(names)), [short_name(n) for n in names], rotation=90, fontsize=7)
        return
    ticks, labels, seen = [], [], set()
    for i, n in enumerate(names):
        layer = layer_index(n)
        key = layer if layer is not None else n
        if key not in seen:
            seen.add(key)
            ticks.append(i)
            labels.append(f"L{layer}" if layer is not None else short_name(n))
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_xlabel("module, in model order (q k v o gate up down per layer)", fontsize=8)


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: str
    name: str  # file-name prefix
    events: list[dict]
    config: dict | None = None
    label: str = ""
    notes: list[str] = field(default_factory=list)


def load_run(path: str) -> Run:
    """A run directory (or its metrics.jsonl) and its config.json; a UserError for anything else."""
    from alphadecay.metrics import read_metrics

    directory = os.path.dirname(path) if os.path.isfile(path) else path
    metrics = path if os.path.isfile(path) else os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        what = "does not exist" if not os.path.exists(path) else "has no metrics.jsonl"
        raise UserError(f"{path} {what}: give a run directory (the --save_dir of a training run, holding "
                        "metrics.jsonl) or a metrics.jsonl file.")
    try:
        events = read_metrics(metrics)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{metrics}: not a metrics.jsonl file ({err}).") from None
    config = None
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            config = json.load(fh)
    name = os.path.basename(os.path.normpath(directory or ".")) or "run"
    return Run(path=directory, name=re.sub(r"[^A-Za-z0-9_.+-]", "_", name), events=events, config=config)


def method_label(config: dict | None) -> str | None:
    """'alphadecay, adamw, wd 0.1' from a run's config.json (the method as TrainConfig.wd_method names it)."""
    if config is None:
        return None
    from alphadecay.config import TrainConfig

    try:
        method = TrainConfig.from_saved(config).wd_method()
    except TypeError:
        return None
    return f"{method}, {config.get('optimizer', '?')}, wd {config.get('weight_decay', float('nan')):g}"


def label_runs(runs: list[Run]) -> None:
    """Labels by method and decay; the seed, then the directory name, are added where labels would collide."""
    for run in runs:
        run.label = method_label(run.config) or run.name
    for extra in ("seed", "name"):
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.label] = counts.get(run.label, 0) + 1
        for run in runs:
            if counts[run.label] > 1:
                if extra == "seed" and run.config is not None and "seed" in run.config:
                    run.label += f", seed {run.config['seed']}"
                elif extra == "name":
                    run.label += f" ({run.name})"
    seen: dict[str, int] = {}
    for run in runs:  # unique file prefixes
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"


def base_decay(config: dict | None) -> float | None:
    """The base decay of a Linear weight: --weight_decay times the scaling rule's matrix factor (None if unknown)."""
    if config is None or not config.get("weight_decay"):
        return None
    rule = config.get("scaling_rule", "none")
    if rule in (None, "none"):
        return float(config["weight_decay"])
    from alphadecay.scaling import rule_multipliers

    try:
        with open(config["model_config"]) as fh:
            width = json.load(fh)["hidden_size"]
        return float(config["weight_decay"]) * rule_multipliers("matrix", rule=rule, width=width,
                                                                base_width=config.get("base_width"))[1]
    except (OSError, KeyError, ValueError, TypeError):
        return None


def module_series(events: list[dict], prefix: str) -> tuple[list[int], list[str], np.ndarray]:
    """Steps, module names (model order: the order the pass logs them) and a (modules, passes) array of the
    `<prefix>/<module>` values; NaN where a pass lacks a module or logged null."""
    names: dict[str, None] = {}
    passes = []
    for event in events:
        values = {k[len(prefix) + 1:]: v for k, v in event.items() if k.startswith(prefix + "/")}
        if values:
            names.update(dict.fromkeys(values))
            passes.append((event.get("step", len(passes)), values))
    order = list(names)
    table = np.full((len(order), len(passes)), np.nan)
    for j, (_, values) in enumerate(passes):
        for i, n in enumerate(order):
            v = values.get(n)
            table[i, j] = v if isinstance(v, (int, float)) else np.nan
    return [s for s, _ in passes], order, table


def heatmap_figure(steps: list[int], names: list[str], values: np.ndarray, *, title: str, colorbar: str,
                   cmap: str = "viridis"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(12.0, 4.0 + 0.25 * len(steps)), min(11.0, 1.6 + 0.14 * len(names))))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cmap)
    fig.colorbar(image, ax=ax, label=colorbar, fraction=0.05, pad=0.02)
    every = max(1, math.ceil(len(steps) / 16))
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], fontsize=7,
                  rotation=45 if len(steps) > 8 else 0)
    ax.set_xlabel("update (module-wise pass)")
    if len(names) <= 60:
        ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=6 if len(names) > 30 else 7)
    else:
        rows = [i for i, n in enumerate(names) if module_kind(n) in ("q", "k") and (i == 0 or
                layer_index(names[i - 1]) != layer_index(n))]
        ax.set_yticks(rows, [f"L{layer_index(names[i])}" for i in rows], fontsize=6)
    ax.set_ylabel("module (model order)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def type_means_figure(steps: list[int], names: list[str], panels: list[tuple[np.ndarray, str]], *, title: str):
    """One panel per (values, y label): the mean over each module type's rows at each pass."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
    kinds = [module_kind(n) for n in names]
    for ax, (values, ylabel) in zip(axes[0], panels):
        for kind in KINDS + ("linear",):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if rows:
                with np.errstate(all="ignore"):
                    mean = np.nanmean(values[rows], axis=0) if np.isfinite(values[rows]).any() else None
                if mean is not None:
                    style = "-" if kind in ATTENTION_KINDS else "--"
                    ax.plot(steps, mean, style, marker="o", ms=3, color=KIND_COLORS[kind], label=kind)
        ax.set(xlabel="update", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(runs: list[Run]):
    """Training loss and evaluation perplexity against updates, one colour per run."""
    plt = _pyplot()
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        loss = [(e["step"], e["loss"]) for e in run.events if isinstance(e.get("loss"), (int, float))]
        ppl = [(e["step"], e["eval_ppl"]) for e in run.events if isinstance(e.get("eval_ppl"), (int, float))]
        (line,) = loss_ax.plot(*zip(*loss), lw=1.2, label=run.label) if loss else loss_ax.plot([], [], label=run.label)
        if ppl:
            ppl_ax.plot(*zip(*ppl), marker="o", ms=4, lw=1.2, color=line.get_color(), label=run.label)
    loss_ax.set(xlabel="update", ylabel="training loss", title="training loss")
    ppl_ax.set(xlabel="update", ylabel="evaluation perplexity", yscale="log", title="evaluation perplexity")
    for ax in (loss_ax, ppl_ax):
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_figures(run: Run, out: str) -> list[str]:
    """The per-run figures; a note on run.notes for each that cannot be drawn."""
    decay_steps, decay_names, decays = module_series(run.events, "wd")
    if not decay_names:
        method = method_label(run.config)
        run.notes.append(f"{run.path}: no module-wise decay pass in metrics.jsonl (no wd/<module> values"
                         + (f"; the run's method is {method.split(',')[0]}" if method else "")
                         + "), so no heatmaps or per-type means for it; only the loss curves.")
        return []
    written = []
    metric = "alpha" if any(k.startswith("alpha/") for e in run.events for k in e) else None
    if metric is None:  # AdaDecay: the metric that drives the decay, under its own key
        prefixes = {k.split("/", 1)[0] for e in run.events for k in e if "/" in k and k.split("/", 1)[1] in decay_names}
        preferred = (run.config or {}).get("esd_metric_for_tb")
        metric = preferred if preferred in prefixes else next(iter(sorted(prefixes - {"wd", "sigma_max"})), None)
    base = base_decay(run.config)
    multipliers = decays / base if base else decays
    decay_label = "decay multiplier (wd / base decay)" if base else "weight decay (base unknown: no config.json)"
    panels = []
    if metric is not None:
        steps, names, values = module_series(run.events, metric)
        written.append(save(heatmap_figure(steps, names, values, title=f"{run.label}: {metric} per module",
                                           colorbar=metric), os.path.join(out, f"{run.name}_{metric}_heatmap.png")))
        panels.append((_align(values, names, steps, decay_names, decay_steps), f"mean {metric}"))
    suffix = "decay_multiplier" if base else "decay"
    written.append(save(heatmap_figure(decay_steps, decay_names, multipliers, title=f"{run.label}: {decay_label}",
                                       colorbar=decay_label, cmap="magma"),
                        os.path.join(out, f"{run.name}_{suffix}_heatmap.png")))
    panels.append((multipliers, "mean " + decay_label))
    means = type_means_figure(decay_steps, decay_names, panels, title=f"{run.label}: means per module type")
    written.append(save(means, os.path.join(out, f"{run.name}_type_means.png")))
    return written


def _align(values: np.ndarray, names: list[str], steps: list[int], target_names: list[str],
           target_steps: list[int]) -> np.ndarray:
    """`values` (names × steps) re-indexed onto the decay table's rows and columns (NaN where missing)."""
    out = np.full((len(target_names), len(target_steps)), np.nan)
    row = {n: i for i, n in enumerate(names)}
    col = {s: j for j, s in enumerate(steps)}
    for i, n in enumerate(target_names):
        for j, s in enumerate(target_steps):
            if n in row and s in col:
                out[i, j] = values[row[n], col[s]]
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alphadecay.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their metrics.jsonl)")
    parser.add_argument("--out", required=True, help="directory for the PNG files (created if missing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        runs = [load_run(path) for path in args.runs]
        os.makedirs(args.out, exist_ok=True)
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    label_runs(runs)
    written = []
    for run in runs:
        if not run.events:
            run.notes.append(f"{run.path}: metrics.jsonl has no events yet.")
            continue
        written += run_figures(run, args.out)
    if any(run.events for run in runs):
        written.append(save(curves_figure(runs), os.path.join(args.out, "loss_and_eval_ppl.png")))
    for run in runs:
        for note in run.notes:
            print(f"note: {note}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
