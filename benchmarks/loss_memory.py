"""Peak memory of the loss, whole-micro-batch logits vs chunked (--loss_chunk_tokens), at the 60M vocabulary on CPU.

    python benchmarks/loss_memory.py                        # head + loss, 16 x 256 tokens, d 512, V 32000, float32
    python benchmarks/loss_memory.py --dtype bfloat16 --chunks 512,2048
    python benchmarks/loss_memory.py --whole_model          # a whole llama_60m forward + backward (slower)

What is measured: the resident-set high-water mark (Linux VmHWM) of a fresh process per variant, above its
resident size just before the measured forward + backward. Why this and not tracemalloc or torch's profiler:
tracemalloc sees only Python's allocator, not torch's CPU tensors; torch keeps no CPU allocator statistics, and
the profiler's memory events need post-processing into a timeline. The kernel's high-water mark counts every
page actually touched, i.e. every tensor torch allocates and writes. To make it a measurement of the computation
and not of history, each child process: builds its inputs, runs the forward + backward once (warm-up: lazy
library buffers, first-touch of the weights' gradients), frees the gradients, resets the high-water mark
(`echo 5 > /proc/self/clear_refs`), runs it again and reports VmHWM - VmRSS. glibc is told to serve every block
above 64 KiB with its own mmap (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once and
cannot hide a later allocation inside recycled heap; the figure is then the peak of simultaneously live tensors
(plus page rounding). Each variant runs in its own process, so neither inherits the other's allocations.

Baseline: the full loss, computed exactly as `--loss_chunk_tokens 0` does (logits of the whole micro-batch, upcast
to float32, F.cross_entropy). The "logits" column is what one fp32 copy of the whole batch's logits takes. The
chunked losses must equal the baseline's (checked: relative difference printed, limit 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def child(args: argparse.Namespace) -> None:
    """One variant in this (fresh) process; prints one JSON line."""
    import torch

    sys.path.insert(0, str(REPO))
    from alphadecay.data import IGNORE_INDEX
    from alphadecay.loss import CausalLMLoss, chunked_cross_entropy_sum
    from alphadecay.model import build_model, load_model_config

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    config = load_model_config(str(REPO / "configs" / f"llama_{args.config}.json"))
    ids = torch.randint(3, config.vocab_size, (args.rows, args.max_length), generator=gen)
    if args.whole_model:
        model = CausalLMLoss(build_model(config, seed=0).to(dtype), args.chunk)
        params = list(model.parameters())

        def step() -> torch.Tensor:
            loss = model(ids, ids)
            loss.backward()
            return loss
    else:
        hidden = torch.randn(args.rows * args.max_length, config.hidden_size, generator=gen).to(dtype)
        weight = (torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02).to(dtype)
        hidden.requires_grad_()
        weight.requires_grad_()
        params = [hidden, weight]
        targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()

        def step() -> torch.Tensor:
            if args.chunk == 0:
                logits = hidden @ weight.t()
                logits = logits if logits.dtype == torch.float32 else logits.float()
                loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            else:
                loss = chunked_cross_entropy_sum(hidden, weight, targets, chunk_tokens=args.chunk)
            loss.backward()
            return loss

    step()
    for p in params:
        p.grad = None
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    loss = step()
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "loss": float(loss)}))


def run_variant(args: argparse.Namespace, chunk: int) -> dict:
    command = [sys.executable, __file__, "--child", "--chunk", str(chunk), "--rows", str(args.rows),
               "--max_length", str(args.max_length), "--dtype", args.dtype, "--config", args.config,
               "--threads", str(args.threads)] + (["--whole_model"] if args.whole_model else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"variant chunk={chunk} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="60m", help="configs/llama_<config>.json (its vocabulary and width)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--chunks", default="1024,4096", help="comma-separated --loss_chunk_tokens values")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--whole_model", action="store_true", help="a whole model forward + backward, not the head")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("this benchmark reads Linux's /proc/self/status and resets /proc/self/clear_refs")
    tokens = args.rows * args.max_length
    vocab = json.loads((REPO / "configs" / f"llama_{args.config}.json").read_text())["vocab_size"]
    logits_mib = tokens * vocab * 4 / 2**20
    what = "whole model forward + backward" if args.whole_model else "lm_head + loss forward + backward"
    print(f"llama_{args.config} vocabulary {vocab}, {args.rows} x {args.max_length} = {tokens} tokens, {args.dtype}, "
          f"{what}; one fp32 copy of the batch's logits = {logits_mib:,.0f} MiB")
    print(f"{'loss':<22} {'peak above start':>17} {'vs full':>8} {'loss rel. diff':>15}")
    base = run_variant(args, 0)
    print(f"{'full (chunk 0)':<22} {base['peak_mib']:>13,.0f} MiB {1.0:>8.2f} {'-':>15}")
    ok = True
    for chunk in (int(c) for c in args.chunks.split(",")):
        got = run_variant(args, chunk)
        diff = abs(got["loss"] - base["loss"]) / abs(base["loss"])
        ok &= diff <= 1e-5
        print(f"{f'chunked {chunk} tokens':<22} {got['peak_mib']:>13,.0f} MiB {got['peak_mib'] / base['peak_mib']:>8.2f} "
              f"{diff:>15.1e}")
    print("all losses agree" if ok else "FAILED: a chunked loss differs from the full loss by more than 1e-5")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
