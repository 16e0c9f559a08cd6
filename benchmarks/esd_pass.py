"""Time of one AlphaDecay ESD pass: our `module_metrics` against the official per-module computation.

    python benchmarks/esd_pass.py                                   # 60m and 130m, 1 and 2 ranks, median fit, CPU
    python benchmarks/esd_pass.py --configs 60m --fit goodness-of-fit --world_size 1
    python benchmarks/esd_pass.py --configs 130m --device cuda --world_size 1
    python benchmarks/esd_pass.py --farms --configs 1b --device cuda     # FARMS windows and time at 1B's shapes
    python benchmarks/esd_pass.py --farms --configs 60m --farms_window 500 --variants random   # 1B's regime, on a CPU

Weights: the LLaMA of configs/llama_<size>.json built under torch.manual_seed(0), in two variants: random init,
and "heavy-tailed" (each Linear weight replaced by U diag(s) Vᵀ with random orthogonal U, V and a power-law
spectrum λ_r ∝ r^(-1/(a-1)), a ~ U(2, 4) per module, Frobenius norm kept; seeded).

Baseline: `esd.reference_module_metrics`, i.e. what the official code does (WeightDecayUnbalance.py:216-310): fp32
`svdvals` of EVERY Linear (7L+1 matrices, including layer-0 q_proj and lm_head, which it then discards), one at a
time, with the official Python-loop fits. Ours: `esd.module_metrics` on the tuned set only (7L-1 matrices), in one
process (all threads) and sharded over gloo ranks (one thread each). Timings: one warm-up, then the median of
--repeats; the sharded time is the slowest rank's, measured between barriers. The script fails if a tuned module's
alpha differs from the baseline's by more than 1e-4 (relative). For the search fits (--fit goodness-of-fit or
fix-finger) that check is made on the same eigenvalues, and the end-to-end difference is only printed: the chosen
xmin jumps with the eigenvalues, and at random init goodness-of-fit fits α ≈ 9-15 on a handful of top eigenvalues,
which amplifies their rounding differences (svdvals vs Gram) to ~1e-4.

--farms measures FARMS (`--esd_estimator farms`, median fit) instead, at the shapes of each config's tuned Linears
(hidden², intermediate × hidden, hidden × intermediate; one random N(0, 0.02) matrix of each, or its heavy-tailed
variant): per shape, the windows per matrix and the time of `module_metrics` on one matrix with the authors'
window positions (`FarmsSampling(min_step=0)`) and with the default (`min_step` 0.05), alpha both ways; then the
model's totals (windows, and the pass time estimated as Σ matrices × time per matrix). Both samplings pool the
same kind of windows, so their alphas differ by the near-duplicate windows' weight only; the script fails if they
differ by more than FARMS_TOLERANCE (relative) or one is not finite. At 1B the authors' positions mean 225
eigendecompositions of 2000² per matrix: run it on a GPU (a 2-core CPU takes seconds to minutes for each).
--farms_window W (default 2000) changes the window of both samplings: 500 on 60M's 512-wide sides is 1B's regime
(a window a little smaller than the side) at a size a CPU can time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphadecay import esd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
# default vs authors' FARMS positions, median fit, random init: 3e-4..3e-3 relative on 512-wide analogues of 1B's
# shapes (500² windows, span 12 -> 13 positions 1 apart, against 1) on this CPU
FARMS_TOLERANCE = 2e-2
FARMS_SAMPLINGS = {"authors": esd.FarmsSampling(min_step=0), "default": esd.FarmsSampling()}


def farms_samplings(window: int = esd.FarmsSampling.window) -> dict[str, esd.FarmsSampling]:
    """The authors' positions (min_step 0) and the default, with window `window`."""
    return {name: dataclasses.replace(s, window=window) for name, s in FARMS_SAMPLINGS.items()}
Weights = list[tuple[str, torch.Tensor]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="60m,130m", help="comma-separated sizes of configs/llama_<size>.json")
    parser.add_argument("--world_size", default="1,2", help="comma-separated rank counts for the sharded pass")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fit", default="median", choices=list(esd.FIT_METHODS))
    parser.add_argument("--variants", default="random,heavy", help="random (init) and/or heavy (power-law spectra)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    parser.add_argument("--farms", action="store_true", help="FARMS window counts and times at the configs' shapes "
                                                             "(authors' positions vs the default min_step)")
    parser.add_argument("--farms_window", type=int, default=esd.FarmsSampling.window, help="with --farms: the window")
    return parser.parse_args(argv)


# -- weights -------------------------------------------------------------------------------------------------------
def linear_weights(size: str) -> Weights:
    """Every nn.Linear weight of the config's model, in module order (layer-0 q_proj first, lm_head last)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig.from_json_file(str(REPO / "configs" / f"llama_{size}.json"))
    model = transformers.LlamaForCausalLM(config)
    return [(name, m.weight.detach()) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def heavy_tailed(weights: Weights, seed: int = 1234) -> Weights:
    """Each weight replaced by U diag(s) Vᵀ with a power-law spectrum (eigenvalue density exponent a ∈ [2, 4])."""
    out = []
    for i, (name, w) in enumerate(weights):
        gen = torch.Generator().manual_seed(seed + i)
        n, m = w.shape
        k = min(n, m)
        a = 2 + 2 * torch.rand((), generator=gen, dtype=torch.float64)
        s = torch.arange(1, k + 1, dtype=torch.float64) ** (-0.5 / (a - 1))
        s *= w.double().norm() / s.norm()
        u, v = _orthonormal(n, k, gen), _orthonormal(m, k, gen)
        out.append((name, ((u * s) @ v.T).to(w.dtype)))
    return out


def tuned_shapes(size: str) -> list[tuple[tuple[int, int], int]]:
    """The shapes of configs/llama_<size>.json's tuned Linears (official defaults: 7L − 1, without layer-0 q_proj
    and lm_head) and how many matrices have each: q, k, v, o (hidden²), gate, up (intermediate × hidden), down."""
    config = json.loads((REPO / "configs" / f"llama_{size}.json").read_text())
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return [((hidden, hidden), 4 * layers - 1), ((inner, hidden), 2 * layers), ((hidden, inner), layers)]


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# -- timing --------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True
          ) -> tuple[list[float], object]:
    """Seconds of `repeats` calls after one warm-up call (unless warmup=False), and the last result."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def show(times: list[float]) -> str:
    return f"median {statistics.median(times):7.3f} s (min {min(times):.3f})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sharded(weights: Weights, world_size: int, fit: str, repeats: int) -> tuple[list[float], list[float], list[dict]]:
    """Per repeat, the slowest rank's seconds for module_metrics over `world_size` gloo ranks; each rank's median;
    each rank's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(world_size, port, weights, fit, repeats, queue), nprocs=world_size, join=True)
    reports = sorted((queue.get() for _ in range(world_size)), key=lambda r: r["rank"])
    return reports[0]["slowest"], [r["own"] for r in reports], [r["metrics"] for r in reports]


def _rank_main(rank: int, world_size: int, port: int, weights: Weights, fit: str, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        def one_pass() -> tuple[float, float, dict]:
            dist.barrier()
            start = time.perf_counter()
            metrics = esd.module_metrics(weights, fit=fit)
            own = time.perf_counter() - start
            slowest = torch.tensor(own)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            return own, float(slowest), metrics

        one_pass()
        runs = [one_pass() for _ in range(repeats)]
        queue.put({"rank": rank, "own": statistics.median(r[0] for r in runs), "slowest": [r[1] for r in runs],
                   "metrics": runs[-1][2]})
    finally:
        dist.destroy_process_group()


# -- FARMS -----------------------------------------------------------------------------------------------------------
def farms_at_shapes(size: str, variant: str, device: torch.device, repeats: int,
                    samplings: dict[str, esd.FarmsSampling] = FARMS_SAMPLINGS) -> list[dict]:
    """Per tuned shape of llama_<size>: {"shape", "matrices", and per sampling ("authors", "default"): {"windows"
    per matrix, "seconds" (median of `repeats` module_metrics calls on one matrix, after a warm-up with the
    default sampling), "alpha"}}."""
    rows = []
    for k, ((n, m), count) in enumerate(tuned_shapes(size)):
        w = torch.randn(n, m, generator=torch.Generator().manual_seed(k)) * 0.02
        if variant == "heavy":
            w = heavy_tailed([("w", w)], seed=4321 + k)[0][1]
        named = [("w", w.to(device))]
        esd.module_metrics(named, estimator="farms", farms=samplings["default"])  # warm-up: solver handles, kernels
        row: dict = {"shape": (n, m), "matrices": count}
        for name, sampling in samplings.items():
            _, long_offsets, short_offsets = esd.farms_windows((n, m), sampling)
            times, out = timed(lambda: esd.module_metrics(named, estimator="farms", farms=sampling), repeats, device,
                               warmup=False)
            row[name] = {"windows": len(long_offsets) * len(short_offsets), "seconds": statistics.median(times),
                         "alpha": out["w"]["alpha"]}
        rows.append(row)
    return rows


def farms_alpha_diff(row: dict) -> float:
    """|α_default − α_authors| / α_authors of one shape; inf when either is not finite."""
    a, b = row["default"]["alpha"], row["authors"]["alpha"]
    return abs(a - b) / abs(b) if math.isfinite(a) and math.isfinite(b) else math.inf


def farms_totals(rows: list[dict]) -> dict[str, tuple[int, float]]:
    """Per sampling: (windows, estimated pass seconds) of the whole tuned set."""
    return {name: (sum(r["matrices"] * r[name]["windows"] for r in rows),
                   sum(r["matrices"] * r[name]["seconds"] for r in rows)) for name in ("authors", "default")}


def bench_farms(size: str, variant: str, args: argparse.Namespace) -> bool:
    device = torch.device(args.device)
    samplings = farms_samplings(args.farms_window)
    sampling = samplings["default"]
    print(f"\n== FARMS at llama_{size}'s tuned shapes  {variant}  median fit  device={device}  (window "
          f"{sampling.window}, {sampling.per_dim} positions per side; authors' positions = min_step 0, default "
          f"min_step {sampling.min_step})")
    rows = farms_at_shapes(size, variant, device, args.repeats, samplings)
    print(f"{'shape':>11} {'matrices':>8}  {'windows/matrix':>16}  {'s/matrix authors -> default':>28}  "
          f"{'alpha authors -> default':>26}")
    for r in rows:
        a, d = r["authors"], r["default"]
        print(f"{r['shape'][0]:>5}x{r['shape'][1]:<5} {r['matrices']:>8}  {a['windows']:>7} -> {d['windows']:<6}  "
              f"{a['seconds']:>12.3f} -> {d['seconds']:<12.3f}  {a['alpha']:.5f} -> {d['alpha']:.5f} "
              f"({farms_alpha_diff(r):.1e})")
    totals = farms_totals(rows)
    (wa, sa), (wd, sd) = totals["authors"], totals["default"]
    print(f"tuned set: {wa:,} -> {wd:,} windows; estimated FARMS pass {sa:.1f} s -> {sd:.1f} s "
          f"({sa / sd:.1f}x faster; each matrix's full ESD included)")
    worst = max(farms_alpha_diff(r) for r in rows)
    print(f"max relative alpha difference, default vs authors' positions: {worst:.1e} (limit {FARMS_TOLERANCE:g})")
    return worst <= FARMS_TOLERANCE


# -- comparison ----------------------------------------------------------------------------------------------------
def max_rel_alpha_diff(ours: dict, reference: dict) -> float:
    """max |α − α_ref| / |α_ref| over our modules; inf when exactly one of the two is NaN."""
    worst = 0.0
    for name, row in ours.items():
        a, b = row["alpha"], reference[name]["alpha"]
        if math.isnan(a) and math.isnan(b):
            continue
        worst = max(worst, abs(a - b) / abs(b) if not (math.isnan(a) or math.isnan(b)) else math.inf)
    return worst


def same_eigs_fit_diff(weights: Weights, fit: str) -> float:
    """max relative α difference between the vectorised fit and the official loop on identical eigenvalues."""
    eigs = esd.eigenvalues([w for _, w in weights])
    worst = 0.0
    for size in sorted({len(e) for e in eigs}):
        batch = torch.stack([e for e in eigs if len(e) == size])
        alpha, _ = esd.fit_power_law(batch, method=fit)
        for a, row in zip(alpha.tolist(), batch):
            b, _ = esd.reference_fit_power_law(row.cpu(), method=fit)
            worst = max(worst, 0.0 if math.isnan(a) and math.isnan(b) else abs(a - b) / abs(b))
    return worst


def alpha_by_type(metrics: dict) -> str:
    groups: dict[str, list[float]] = {}
    for name, row in metrics.items():
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(row["alpha"])
    return "  ".join(f"{kind} {statistics.fmean(v):.3f}" for kind, v in groups.items())


# -- main ----------------------------------------------------------------------------------------------------------
def bench(size: str, variant: str, args: argparse.Namespace, world_sizes: list[int]) -> bool:
    device = torch.device(args.device)
    weights = linear_weights(size)
    if variant == "heavy":
        weights = heavy_tailed(weights)
    weights = [(n, w.to(device)) for n, w in weights]
    tuned = weights[1:-1]  # official defaults: drop layer-0 q_proj and lm_head
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n== llama_{size}  {variant}  fit={args.fit}  device={device}  ({len(weights)} Linears, {len(tuned)} tuned)"
          f"  [load average {load}]")
    base, reference = timed(lambda: esd.reference_module_metrics(weights, fit=args.fit), args.repeats, device)
    base_s = statistics.median(base)
    print(f"baseline  reference_module_metrics, ALL {len(weights)} Linears (7L+1 like the official code, i.e. also "
          f"layer-0 q_proj and lm_head), 1 process x {torch.get_num_threads()} threads: {show(base)}")
    ok = True
    if 1 in world_sizes:
        fast, ours = timed(lambda: esd.module_metrics(tuned, fit=args.fit), args.repeats, device)
        every, _ = timed(lambda: esd.module_metrics(weights, fit=args.fit), args.repeats, device)
        threads = torch.get_num_threads()
        print(f"ours      module_metrics, the {len(tuned)} tuned Linears, 1 process x {threads} threads:"
              f" {show(fast)}   speed-up {base_s / statistics.median(fast):5.2f}x")
        print(f"ours      module_metrics, all {len(weights)} Linears (the baseline's work), 1 process:"
              f" {show(every)}   speed-up {base_s / statistics.median(every):5.2f}x")
        ok &= report_agreement(ours, reference, tuned, args.fit)
        print(f"alpha by type (ours): {alpha_by_type(ours)}")
    # Sharding at equal per-rank resources (one thread each): 1 rank first, so the fall with ranks is visible.
    for world in ([1] if max(world_sizes) > 1 else []) + [w for w in world_sizes if w > 1]:
        if device.type != "cpu":
            print(f"(skipping {world} ranks: the sharded benchmark uses gloo on CPU)")
            continue
        slowest, own, per_rank = sharded(tuned, world, args.fit, args.repeats)
        identical = all(r == per_rank[0] for r in per_rank[1:])
        print(f"ours      module_metrics, the {len(tuned)} tuned Linears, {world} gloo rank(s) x 1 thread, slowest rank:"
              f" {show(slowest)}   speed-up {base_s / statistics.median(slowest):5.2f}x")
        print(f"          per-rank medians {', '.join(f'{t:.3f}' for t in own)} s; all ranks' dicts identical: "
              f"{identical}")
        ok &= identical and report_agreement(per_rank[0], reference, tuned, args.fit)
    return ok


def report_agreement(ours: dict, reference: dict, tuned: Weights, fit: str) -> bool:
    diff = max_rel_alpha_diff(ours, reference)
    if fit == "median":
        print(f"max relative alpha difference vs baseline (tuned modules): {diff:.2e}  (limit {TOLERANCE:g})")
        return diff <= TOLERANCE
    fit_diff = same_eigs_fit_diff(tuned, fit)
    print(f"max relative alpha difference, vectorised vs loop fit on the same eigenvalues: {fit_diff:.2e} "
          f"(limit {TOLERANCE:g}); end to end vs baseline (Gram vs svdvals eigenvalues): {diff:.2e}")
    return fit_diff <= TOLERANCE


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_sizes = [int(w) for w in args.world_size.split(",")]
    print(f"torch {torch.__version__}; single process: torch.get_num_threads()={torch.get_num_threads()} (Gram + "
          f"eigvalsh run in that many single-threaded worker threads); sharded: torch.set_num_threads(1) per rank")
    ok = True
    for size in args.configs.split(","):
        for variant in args.variants.split(","):
            ok &= bench_farms(size, variant, args) if args.farms else bench(size, variant, args, world_sizes)
    print("\nall checks passed" if ok else "\nFAILED: see the differences above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
