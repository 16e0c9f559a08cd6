"""The measurements behind benchmarks/gpu_check.sh: one report of what this codebase does on a GPU.

    benchmarks/gpu_check.sh                      # all parts on this machine's GPU -> docs/perf/gpu-<device>.md
    benchmarks/gpu_check.sh --cpu-smoke          # every part reduced (tiny configs, a few updates) on CPU
    benchmarks/gpu_check.sh --parts throughput,esd --out /tmp/perf

Parts, in order (`--parts` picks some):
- tests: the GPU-marked tests (`pytest -m gpu`: bf16 training, chunked loss (its bf16 head gradient rounded once,
  eager and compiled), compiled updates, ESD on CUDA (the blocked Gram product at N >= 512 in fp32 and fp64, a NaN
  weight));
- throughput: tokens/s per device, MFU and peak memory of `Trainer.train_step` (AdamW, Uniform decay, random full
  rows) for llama_60m and llama_130m at the paper's micro-batches (512 and 256 rows of 256 tokens), pure bf16,
  {eager, compiled} x {full, chunked loss}: WARMUP untimed updates (they include the compilation, reported as
  warm-up seconds), then TIMED updates between two synchronisations;
- largest: llama_1b at the largest micro-batch that fits, found by trying candidates downwards from an estimate
  (gpu-and-data.md: ~0.58 GiB per row + ~12.5 GiB fixed for the full loss) and catching out-of-memory, eager, for
  the full and the chunked loss; then its throughput as above with fewer timed updates;
- esd: one AlphaDecay spectral pass (`esd.module_metrics` on the tuned Linears, median fit) on llama_130m and
  llama_1b against the official computation (`esd.reference_module_metrics`: fp32 `svdvals` of every Linear, one
  at a time, the official loop fits) on the same GPU and the same bf16 weights; fails if a tuned module's alpha
  differs by more than 1e-4 (relative). Then FARMS (`--esd_estimator farms`) at the same configs' shapes
  (benchmarks/esd_pass.py --farms: one random matrix per tuned shape, the authors' window positions against the
  default min_step, windows and seconds per matrix, alpha both ways; fails if they differ by more than 2e-2 or one
  is not finite; the authors' positions at 1B: 3 x 225 eigendecompositions of 2000²);
- run: a 200-update AlphaDecay run of llama_60m in bf16 on the shipped sample through `torchrun_main.py` with
  its defaults (so --compile auto compiles); fails unless the loss falls by more than 1 nat, or unless its logged
  MFU (median over log windows) is within 5% of `measure_updates` of the same model and micro-batch (the trainer
  times each update up to its one host read, so what it logs is the GPU's time, not the host's queueing).
- memory: benchmarks/startup_memory.py for llama_1b on the GPU: the host's peak while a rank builds the model
  (on the host in float32 before, on the GPU now) and while it resumes a checkpoint (into memory before, mapped
  now), and the GPU's peak of DDP updates without and with gradient_as_bucket_view (1 and 2 micro-batches of
  4 x 256); fails unless the model built on the GPU equals the host build bit for bit.
- fsdp: `benchmarks/fsdp_check.py` under torchrun, one process per visible GPU: llama_1b in bf16, --parallelism
  fsdp then ddp, peak memory per rank and tokens/s over 10 updates of 8 rows per rank, against the training state
  per rank the formula gives (8 bytes per parameter, / N under FSDP); one AlphaDecay pass through the sharded
  route (time, extra peak memory, alphas against the same weights made whole: fails above 1e-5 relative); a DCP
  checkpoint's save and load. With one GPU nothing is sharded (N = 1), but every FSDP code path runs on NCCL.
The report's first line says what ran, on what, how long it took, and whether every check passed. The exit code
is 1 if a check failed or a part raised, else 0. Out-of-memory in a throughput variant is a result, not a failure.

--cpu-smoke runs the same code with llama_1m, micro-batches of 2-8 rows of 32 tokens, 1 + 2 updates, torch.compile
with dynamo's `eager` backend (graph capture without inductor's C++ compilation, which takes minutes on a CPU),
an 8-update run, and the memory part with the build on `meta` and the rest on the CPU, so that the script cannot
rot before a GPU runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from alphadecay import dist, esd  # noqa: E402
from alphadecay.config import parse_args  # noqa: E402
from alphadecay.metrics import read_metrics  # noqa: E402
from alphadecay.mfu import device_peak_flops, llama_flops_per_token  # noqa: E402
from alphadecay.model import build_model, load_model_config  # noqa: E402
from alphadecay.optim import build_optimizer  # noqa: E402
from alphadecay.wd.groups import module_param_groups  # noqa: E402
from alphadecay.run import wrap_model  # noqa: E402
from alphadecay.trainer import Trainer  # noqa: E402
import startup_memory  # noqa: E402
from esd_pass import FARMS_TOLERANCE, farms_alpha_diff, farms_at_shapes, farms_totals, max_rel_alpha_diff  # noqa: E402

PARTS = ("tests", "throughput", "largest", "esd", "run", "memory", "fsdp")
GPU_TESTS = ("tests/test_gpu.py", "tests/test_gpu_speed.py")
ALPHA_TOLERANCE = 1e-4
MFU_TOLERANCE = 0.05  # the run's logged MFU against the synchronised measurement


@dataclass
class Plan:
    """Sizes and counts of every part: the GPU check, or its CPU smoke reduction."""

    device: torch.device
    dtype: torch.dtype
    compile_backend: str  # inductor on the GPU; dynamo's eager backend in the CPU smoke
    max_length: int = 256
    throughput: list[tuple[str, int]] = field(default_factory=lambda: [("60m", 512), ("130m", 256)])
    chunk_tokens: int = 8192
    warmup: int = 3
    timed: int = 30
    large: str = "1b"
    large_timed: int = 10
    large_candidates: tuple[int, ...] = (512, 384, 256, 192, 160, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8, 4, 2, 1)
    esd_configs: tuple[str, ...] = ("130m", "1b")
    run_args: dict = field(default_factory=lambda: {
        "model_config": "configs/llama_60m.json", "dtype": "bfloat16", "device": "cuda", "batch_size": 64,
        "total_batch_size": 64, "max_length": 256, "num_training_steps": 200, "warmup_steps": 20, "lr": 1e-3,
        "eval_every": 200, "log_every": 10, "target_eval_tokens": 200_000, "unbalancedWD_every": 50})
    min_loss_drop: float = 1.0
    # benchmarks/startup_memory.py: config, device of the build part, device of the resume and ddp parts, ddp sizes
    memory_config: str = "1b"
    memory_build_device: str = "cuda:0"
    memory_device: str = "cuda:0"
    memory_ddp: tuple[int, int, str] = (4, 256, "1,2")  # rows, tokens per row, micro-batches per update
    fsdp: dict = field(default_factory=lambda: {"config": "1b", "micro": 8, "max_length": 256, "timed": 10})

    @classmethod
    def cpu_smoke(cls) -> Plan:
        return cls(device=torch.device("cpu"), dtype=torch.float32, compile_backend="eager", max_length=32,
                   throughput=[("1m", 4)], chunk_tokens=48, warmup=1, timed=2, large="1m", large_timed=2,
                   large_candidates=(8, 4, 2), esd_configs=("1m",),
                   run_args={"model_config": "configs/llama_1m.json", "dtype": "float32", "device": "cpu",
                             "batch_size": 4, "total_batch_size": 8, "max_length": 64, "num_training_steps": 8,
                             "warmup_steps": 2, "lr": 3e-3, "eval_every": 8, "log_every": 1,
                             "target_eval_tokens": 4000, "unbalancedWD_every": 2, "shuffle_buffer": 64},
                   min_loss_drop=0.0, memory_config="1m", memory_build_device="meta", memory_device="cpu",
                   memory_ddp=(2, 32, "2"), fsdp={"config": "1m", "micro": 2, "max_length": 32, "timed": 2})


# -- helpers ---------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # drop compiled graphs (and the weights they reference)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def config_path(size: str) -> str:
    return str(REPO / "configs" / f"llama_{size}.json")


def new_model(size: str, plan: Plan) -> torch.nn.Module:
    """The config's model, initialised on the device itself (a 1B model initialises in seconds there, not on CPU)."""
    with plan.device:
        return build_model(load_model_config(config_path(size)), seed=0).to(dtype=plan.dtype)


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f}"


@dataclass
class Measurement:
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_bytes: float | None = None
    warmup_s: float = 0.0
    note: str = ""


def measure_updates(size: str, micro_batch: int, *, compiled: bool, chunk: int, timed: int, plan: Plan,
                    peak_flops: float | None) -> Measurement:
    """tokens/s, MFU and peak memory of `timed` updates of one micro-batch after plan.warmup untimed ones."""
    device = plan.device
    args = ["--model_config", config_path(size), "--optimizer", "adamw", "--weight_decay", "0.1",
            "--loss_chunk_tokens", str(chunk), "--max_length", str(plan.max_length)]
    config, _ = parse_args(args)
    info = dist.DistInfo(0, 0, 1, device)
    raw = model = trainer = optimizer = ids = batch = None
    free_memory(device)
    try:
        raw = new_model(size, plan)
        optimizer = build_optimizer(module_param_groups(raw, 0.1), config, device)
        model = wrap_model(raw, config, info, compile=False)
        if compiled:  # what --compile true does (wrap_model), with the plan's backend
            model = torch.compile(model, backend=plan.compile_backend)
        trainer = Trainer.for_updates(config, info, model, optimizer, raw_model=raw)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, raw.config.vocab_size, (micro_batch, plan.max_length), generator=gen).to(device)
        batch = [{"input_ids": ids, "labels": ids}]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(plan.warmup):
            trainer.train_step(batch)
        sync(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(timed):
            trainer.train_step(batch)
        sync(device)
        seconds = time.perf_counter() - start
        rate = timed * ids.numel() / seconds
        flops = llama_flops_per_token(raw.config, plan.max_length)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return Measurement(tokens_per_s=rate, mfu=flops * rate / peak_flops if peak_flops else None, peak_bytes=peak,
                           warmup_s=warmup_s)
    except Exception as err:  # noqa: BLE001 - out of memory is a result; anything else is re-raised
        if not is_oom(err):
            raise
        return Measurement(note="out of memory")
    finally:
        del raw, model, trainer, optimizer, ids, batch
        free_memory(device)


def largest_fitting(fits: Callable[[int], bool], candidates: list[int]) -> tuple[int | None, list[str]]:
    """The first candidate (in the given, descending order) for which fits(candidate) is true, and a log of the
    tries ('128 oom', '96 ok')."""
    tried = []
    for candidate in candidates:
        ok = fits(candidate)
        tried.append(f"{candidate} {'ok' if ok else 'oom'}")
        if ok:
            return candidate, tried
    return None, tried


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# -- parts -------------------------------------------------------------------------------------------------------------
class Report:
    def __init__(self) -> None:
        self.sections: list[str] = []
        self.failures: list[str] = []
        self.durations: dict[str, float] = {}

    def add(self, text: str) -> None:
        self.sections.append(text.rstrip() + "\n")

    def fail(self, message: str) -> None:
        self.failures.append(message)


def part_tests(plan: Plan, report: Report) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    report.add(f"## GPU tests\n\n`{' '.join(['pytest', '-m', 'gpu', *GPU_TESTS])}`: {summary}")
    if done.returncode not in (0, 5):  # 5: nothing collected/selected
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        report.add("```\n" + "\n".join(failed[:20] or lines[-30:]) + "\n```")
        report.fail(f"GPU tests: {summary}")


def part_throughput(plan: Plan, report: Report, peak_flops: float | None) -> None:
    rows = ["| config | micro-batch | compile | loss | tokens/s | MFU | peak memory GiB | warm-up s |",
            "|---|---:|---|---|---:|---:|---:|---:|"]
    for size, micro in plan.throughput:
        for compiled in (False, True):
            for chunk in (0, plan.chunk_tokens):
                m = measure_updates(size, micro, compiled=compiled, chunk=chunk, timed=plan.timed, plan=plan,
                                    peak_flops=peak_flops)
                loss = f"chunked {chunk}" if chunk else "full"
                rows.append(f"| {size} | {micro} | {'compiled' if compiled else 'eager'} | {loss} | "
                            f"{fmt(m.tokens_per_s, ',.0f') if not m.note else m.note} | {fmt(m.mfu, '.1%')} | "
                            f"{fmt(m.peak_bytes and m.peak_bytes / 2**30, '.1f')} | {m.warmup_s:.1f} |")
    report.add(f"## Throughput, {plan.dtype}, sequence {plan.max_length}\n\n`Trainer.train_step` (AdamW, Uniform "
               f"decay) on random full rows: {plan.warmup} warm-up updates (including compilation), then "
               f"{plan.timed} timed. tokens/s per device; MFU from alphadecay/mfu.py (6 x matmul weights + 12 L T d); "
               f"peak memory = torch.cuda.max_memory_allocated.\n\n" + "\n".join(rows))


def part_largest(plan: Plan, report: Report, peak_flops: float | None) -> None:
    size = plan.large
    candidates = list(plan.large_candidates)
    if plan.device.type == "cuda":  # start near the estimate, not at the top of the list
        total_gib = torch.cuda.get_device_properties(plan.device).total_memory / 2**30
        estimate = (total_gib - 12.5) / 0.58
        candidates = [c for c in candidates if c <= 1.3 * estimate] or candidates[-1:]
    rows = ["| loss | largest micro-batch | tries | tokens/s | MFU | peak memory GiB |", "|---|---:|---|---:|---:|---:|"]
    for chunk in (0, plan.chunk_tokens):
        def fits(micro: int) -> bool:
            short = dataclasses.replace(plan, warmup=1)
            return measure_updates(size, micro, compiled=False, chunk=chunk, timed=1, plan=short,
                                   peak_flops=None).note != "out of memory"

        micro, tried = largest_fitting(fits, candidates)
        loss = f"chunked {chunk}" if chunk else "full"
        if micro is None:
            rows.append(f"| {loss} | none fits | {', '.join(tried)} | — | — | — |")
            continue
        m = measure_updates(size, micro, compiled=False, chunk=chunk, timed=plan.large_timed, plan=plan,
                            peak_flops=peak_flops)
        rows.append(f"| {loss} | {micro} | {', '.join(tried)} | {fmt(m.tokens_per_s, ',.0f') if not m.note else m.note}"
                    f" | {fmt(m.mfu, '.1%')} | {fmt(m.peak_bytes and m.peak_bytes / 2**30, '.1f')} |")
    report.add(f"## llama_{size} at the largest micro-batch that fits\n\nEager, {plan.dtype}, sequence "
               f"{plan.max_length}; each try is one update; then {plan.large_timed} timed updates after "
               f"{plan.warmup} warm-up.\n\n" + "\n".join(rows))


def part_esd(plan: Plan, report: Report) -> None:
    rows = ["| config | official: fp32 svdvals per matrix, serial, all 7L+1 Linears (s) | ours: module_metrics, "
            "7L-1 tuned (s) | speed-up | max relative alpha difference |", "|---|---:|---:|---:|---:|"]
    farms_rows = ["| config | shape | matrices | windows per matrix, authors → default | s per matrix, authors → "
                  "default | alpha, authors → default (relative difference) |", "|---|---|---:|---|---|---|"]
    for size in plan.esd_configs:
        model = new_model(size, plan)
        weights = [(n, m.weight.detach()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        tuned = weights[1:-1]  # official defaults: layer-0 q_proj and lm_head keep the base decay
        esd.module_metrics(weights[:2])  # warm-up: solver handles, kernels
        esd.reference_module_metrics(weights[:2])

        def timed(fn):
            sync(plan.device)
            start = time.perf_counter()
            out = fn()
            sync(plan.device)
            return time.perf_counter() - start, out

        official_s, reference = timed(lambda: esd.reference_module_metrics(weights))
        ours_s, ours = timed(lambda: esd.module_metrics(tuned))
        diff = max_rel_alpha_diff(ours, reference)
        rows.append(f"| {size} | {official_s:.2f} | {ours_s:.2f} | {official_s / ours_s:.1f}x | {diff:.1e} |")
        if not diff <= ALPHA_TOLERANCE:
            report.fail(f"esd {size}: alpha differs from the official computation by {diff:.1e} (> {ALPHA_TOLERANCE})")
        farms_rows += farms_table(size, farms_at_shapes(size, "random", plan.device, repeats=1), report)
        del model, weights, tuned
        free_memory(plan.device)
    report.add(f"## One AlphaDecay spectral pass vs the official computation\n\nRandom-init weights in {plan.dtype} "
               f"on {plan.device.type}, median fit, one pass each after a warm-up on two matrices.\n\n"
               + "\n".join(rows))
    report.add("## FARMS: window positions and pass time\n\nMedian fit. Per tuned shape, one random N(0, 0.02) "
               "float32 matrix: windows per matrix and seconds of `module_metrics` on it with the FARMS authors' "
               "positions (`--farms_min_step 0`) and the default (0.05); last row per config: the tuned set's totals, "
               "the pass time estimated as the sum over shapes of matrices x seconds per matrix.\n\n"
               + "\n".join(farms_rows))


def farms_table(size: str, shapes: list[dict], report: Report) -> list[str]:
    """Markdown rows of one config's FARMS comparison; records a failure where the two samplings' alphas differ by
    more than FARMS_TOLERANCE or one is not finite."""
    rows = []
    for r in shapes:
        a, d = r["authors"], r["default"]
        diff = farms_alpha_diff(r)
        rows.append(f"| {size} | {r['shape'][0]}x{r['shape'][1]} | {r['matrices']} | {a['windows']} → {d['windows']} "
                    f"| {a['seconds']:.2f} → {d['seconds']:.2f} | {a['alpha']:.4f} → {d['alpha']:.4f} "
                    f"({diff:.1e}) |")
        if not diff <= FARMS_TOLERANCE:
            report.fail(f"farms {size} {r['shape']}: alpha {a['alpha']} (authors' positions) vs {d['alpha']} "
                        f"(default) differ by {diff:.1e} (> {FARMS_TOLERANCE})")
    (wa, sa), (wd, sd) = farms_totals(shapes).values()
    matrices = sum(r["matrices"] for r in shapes)
    rows.append(f"| {size} | tuned set | {matrices} | {wa:,} → {wd:,} | {sa:.1f} → {sd:.1f} (estimated) | |")
    return rows


def part_run(plan: Plan, report: Report, peak_flops: float | None) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu_check_run-") as run_dir:
        flags = {"dataset": "data/c4_sample", "tokenizer": "data/tokenizer", "optimizer": "adamw",
                 "weight_decay": 0.1, "wd_scheduler": "alphadecay", "wd_max_ratio": 5, "save_every": 100_000,
                 "wandb_mode": "disabled", "save_dir": run_dir, **plan.run_args}
        argv = [str(REPO / "torchrun_main.py")] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        shown = "python torchrun_main.py " + " ".join(argv[1:]).replace(run_dir, "RUN_DIR")
        if done.returncode != 0:
            report.add(f"## 200-update AlphaDecay run\n\n`{shown}` exited with {done.returncode}:\n\n```\n"
                       f"{(done.stdout + done.stderr)[-3000:]}\n```")
            report.fail(f"run: exit code {done.returncode}")
            return
        metrics = read_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    passes = sum(1 for m in metrics if any(k.startswith("alpha/") for k in m))
    first, last = train[0]["loss"], train[-1]["loss"]
    fell = math.isfinite(last) and last < first - plan.min_loss_drop
    speed = train[-1]
    report.add(
        f"## {plan.run_args['num_training_steps']}-update AlphaDecay run on the shipped sample\n\n`{shown}`\n\n"
        f"| wall time (s, whole process) | loss at update {train[0]['step']} | loss at update {train[-1]['step']} | "
        f"eval loss | AlphaDecay passes | tokens/s per device (last log) | MFU (last log) |\n"
        f"|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {seconds:.0f} | {first:.3f} | {last:.3f} | {fmt(evals[-1]['eval_loss'] if evals else None, '.3f')} | "
        f"{passes} | {fmt(speed.get('tokens_per_s_per_device'), ',.0f')} | {fmt(speed.get('mfu'), '.1%')} |\n\n"
        f"Loss fell by more than {plan.min_loss_drop:g}: {'yes' if fell else 'NO'}.")
    if not fell:
        report.fail(f"run: the loss did not fall by more than {plan.min_loss_drop:g} ({first:.3f} -> {last:.3f})")
    compare_logged_mfu(plan, report, train, peak_flops)


def compare_logged_mfu(plan: Plan, report: Report, train: list[dict], peak_flops: float | None) -> None:
    """The run's logged MFU (the median over its log windows after the first, which holds the compilation) against
    `measure_updates` of the same model and micro-batch, compiled, between two synchronisations: the trainer times
    each update up to its one host read, so the two must agree (within MFU_TOLERANCE)."""
    logged = [m["mfu"] for m in train[1:] if m.get("mfu") is not None]
    if not logged or not peak_flops:
        report.add("Logged MFU against the synchronised measurement: not compared (no MFU on this device).")
        return
    size = Path(plan.run_args["model_config"]).stem.split("_", 1)[1]
    reference = measure_updates(size, plan.run_args["batch_size"], compiled=True, chunk=0, timed=plan.timed,
                                plan=plan, peak_flops=peak_flops)
    if reference.mfu is None:
        report.add(f"Logged MFU against the synchronised measurement: no reference ({reference.note}).")
        return
    median = statistics.median(logged)
    ratio = median / reference.mfu
    report.add(f"Logged MFU (median of {len(logged)} windows) {median:.1%} against {reference.mfu:.1%} measured "
               f"between synchronisations for the same model and micro-batch: ratio {ratio:.3f}.")
    if abs(ratio - 1) > MFU_TOLERANCE:
        report.fail(f"run: the logged MFU {median:.1%} differs from the synchronised {reference.mfu:.1%} by more than "
                    f"{MFU_TOLERANCE:.0%}")


def part_memory(plan: Plan, report: Report) -> None:
    rows, ok = [], True
    rows_per_micro, length, accumulations = plan.memory_ddp
    for device, parts in ((plan.memory_build_device, ["build"]), (plan.memory_device, ["resume", "ddp"])):
        args = startup_memory.parse_args(["--config", plan.memory_config, "--device", device, "--rows",
                                          str(rows_per_micro), "--length", str(length), "--accumulations",
                                          accumulations])
        got, passed = startup_memory.measure(args, parts)
        rows += got
        ok &= passed
    report.add(f"## Start-up and gradient memory, llama_{plan.memory_config}\n\n`benchmarks/startup_memory.py` "
               "(its docstring says what each row measures); each variant in a fresh process.\n\n"
               + "\n".join(startup_memory.TABLE_HEAD + rows))
    if not ok:
        report.fail(f"memory: the model built on {plan.memory_build_device} differs from the host build")


def part_fsdp(plan: Plan, report: Report) -> None:
    ranks = torch.cuda.device_count() if plan.device.type == "cuda" else 1
    with tempfile.TemporaryDirectory(prefix="gpu_check_fsdp-") as tmp:
        out = Path(tmp) / "fsdp.json"
        flags = [f"--{k}={v}" for k, v in plan.fsdp.items()] + (["--cpu"] if plan.device.type == "cpu" else [])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   str(REPO / "benchmarks" / "fsdp_check.py"), *flags, f"--out={out}"]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            report.add(f"## FSDP\n\n`{' '.join(command[1:])}` exited with {done.returncode}:\n\n```\n"
                       f"{(done.stdout + done.stderr)[-3000:]}\n```")
            report.fail(f"fsdp: exit code {done.returncode}")
            return
        result = json.loads(out.read_text())
    rows = ["| parallelism | ranks | peak memory per rank (GiB) | training state per rank, formula (GiB) | "
            "tokens/s (all ranks) |", "|---|---:|---:|---:|---:|"]
    for r in result["results"]:
        rows.append(f"| {r['parallelism']} | {r['ranks']} | {fmt(r['peak_bytes'] and r['peak_bytes'] / 2**30, '.2f')} "
                    f"| {r['state_bytes'] / 2**30:.2f} | {r['tokens_per_s']:,.0f} |")
    fsdp = result["results"][0]
    diff = fsdp["esd_max_rel_alpha_diff"]
    extra = fsdp["esd_extra_peak_bytes"]
    report.add(f"## FSDP (--parallelism fsdp) vs DDP, llama_{result['config']}\n\n{result['dtype']}, "
               f"{result['micro']} rows of {result['max_length']} tokens per rank per update, AdamW, "
               f"{plan.fsdp['timed']} timed updates after 2 warm-up.\n\n" + "\n".join(rows) +
               f"\n\nOne AlphaDecay pass through the sharded route ({fsdp['esd_modules']} tuned Linears): "
               f"{fsdp['esd_seconds']:.2f} s, extra peak memory {fmt(extra and extra / 2**20, ',.0f')} MiB per rank, "
               f"max relative alpha difference from the whole weights {diff:.1e}. DCP checkpoint: save "
               f"{fsdp['dcp_save_seconds']:.2f} s, load {fsdp['dcp_load_seconds']:.2f} s.")
    if not diff <= 1e-5:
        report.fail(f"fsdp: the sharded pass's alphas differ from the whole weights' by {diff:.1e} (> 1e-5)")


# -- main ------------------------------------------------------------------------------------------------------------
def device_label(plan: Plan) -> str:
    return torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"


def provenance() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (uncommitted changes)" if git("status", "--porcelain") else ""
    return (f"commit {commit}{dirty}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true", help="every part reduced, on CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", default=None, help="report directory (default docs/perf; runs/gpu_check with "
                                                      "--cpu-smoke)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the "
                                                                           "table of alphadecay/mfu.py")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}; got {args.parts!r}")
    if args.cpu_smoke:
        plan = Plan.cpu_smoke()
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: this check is for a GPU machine (--cpu-smoke runs its reduced form on CPU)")
    else:
        plan = Plan(device=torch.device("cuda", 0), dtype=torch.bfloat16, compile_backend="inductor")
        torch.cuda.set_device(plan.device)
    name = device_label(plan)
    peak_flops = device_peak_flops(plan.device, args.peak_tflops)
    out_dir = Path(args.out) if args.out else REPO / ("runs/gpu_check" if args.cpu_smoke else "docs/perf")
    slug = "cpu-smoke" if args.cpu_smoke else "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    report = Report()
    start = time.perf_counter()
    for part in parts:
        part_start = time.perf_counter()
        print(f"[gpu_check] {part} ...", flush=True)
        try:
            if part == "tests":
                part_tests(plan, report)
            elif part == "throughput":
                part_throughput(plan, report, peak_flops)
            elif part == "largest":
                part_largest(plan, report, peak_flops)
            elif part == "esd":
                part_esd(plan, report)
            elif part == "run":
                part_run(plan, report, peak_flops)
            elif part == "memory":
                part_memory(plan, report)
            elif part == "fsdp":
                part_fsdp(plan, report)
        except Exception as err:  # noqa: BLE001 - one broken part must not hide the others' results
            report.add(f"## {part}\n\nraised {type(err).__name__}: {err}")
            report.fail(f"{part}: {type(err).__name__}: {err}")
        finally:
            free_memory(plan.device)
        report.durations[part] = time.perf_counter() - part_start
    total = time.perf_counter() - start
    durations = ", ".join(f"{p} {s:.0f} s" for p, s in report.durations.items())
    verdict = "all checks passed" if not report.failures else f"{len(report.failures)} check(s) FAILED"
    mode = "gpu_check --cpu-smoke" if args.cpu_smoke else "gpu_check"
    peak = f"{peak_flops / 1e12:g} TFLOP/s bf16 peak" if peak_flops else "peak unknown: no MFU"
    lines = [f"{mode} on {name} ({peak}): {', '.join(parts)} in {total / 60:.1f} min ({durations}); {verdict}", "",
             provenance(), ""]
    if report.failures:
        lines += ["Failed checks:", *[f"- {f}" for f in report.failures], ""]
    text = "\n".join(lines) + "\n" + "\n".join(report.sections)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug}.md"
    path.write_text(text)
    print(text)
    print(f"[gpu_check] report written to {path}")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
