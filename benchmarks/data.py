"""Data supply to one rank (row tokens/s) from streaming, from pretokenized rows, and the pretokenizer's own speed.

    python benchmarks/data.py                      # the shipped sample and tokenizer, rows of 256 tokens
    python benchmarks/data.py --seconds 20 --skip_pretokenizer

Each figure is printed as a ratio to the demand of one H100 stated below (an estimate from published
throughput: ≈1.0M row tokens/s on the 60M config, ≈0.5M on 130M, compiled, pure bf16, sequence 256); the
pretokenized rows also as a ratio to the streaming path measured in the same run. Row tokens count every position of a (rows, max_length) batch, pads
included, because that is what the GPU computes on.

- streaming: `data.TokenBatches` over `data.DocumentStream` (what the trainer's background thread runs), paper
  mode and --packing, micro-batches of --batch_size; the first batch (opening the shards) is not timed.
- pretokenized: `PretokenizedBatches` of one rank, global batch --total_batch_size cut into micro-batches of
  --batch_size, int64 input_ids and labels as the trainer receives them, from the sample pretokenized by this
  script into a temporary directory (its rows are in the page cache, as a C4 directory of a few GB would be after
  the first epoch; the first epoch of a larger-than-memory directory reads rows from disk).
- pretokenizer: `python -m alphadecay.pretokenize` on the sample's train split (8 shards) with 1 and 2 workers:
  the whole command, and the rows of shards 2..8 over the time from the first finished shard to the last, which
  leaves out the start-up (imports, spawning workers, opening the tokenizer) that C4's 1024 shards of ~356k
  documents make negligible but this small sample does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphadecay import data, pretokenize, pretokenized  # noqa: E402

DEMAND = {"60M": 1.0e6, "130M": 0.5e6}  # row tokens/s one H100 consumes (estimate, no GPU measured)


def timed_batches(batches, seconds: float) -> tuple[float, int]:
    """(tokens/s, batches timed) over `seconds` of iteration, after one untimed batch."""
    it = iter(batches)
    next(it)
    tokens, count, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch, _ = next(it)
        tokens += batch["input_ids"].numel()
        count += 1
    return tokens / (time.perf_counter() - start), count


def streaming(args, tokenizer, packing: bool) -> float:
    spec = data.RowSpec.from_tokenizer(tokenizer, args.max_length, packing)
    files = data.list_shards(args.dataset, "en", "train")
    stream = data.DocumentStream(files, rank=0, world_size=1, seed=0, buffer_size=1000)
    rate, _ = timed_batches(data.TokenBatches(stream, tokenizer, spec, args.batch_size), args.seconds)
    return rate


def pretokenized_rows(args, tokenizer, directory: str) -> float:
    spec = data.RowSpec.from_tokenizer(tokenizer, args.max_length, False)
    split = pretokenized.Pretokenized(directory).split("train")
    batches = pretokenized.PretokenizedBatches(split, spec, seed=0, total_batch_size=args.total_batch_size,
                                               batch_size=args.batch_size, rank=0, world_size=1, announce=False)
    rate, _ = timed_batches(batches, args.seconds)
    return rate


def run_pretokenizer(args, out: str, workers: int) -> tuple[float, float, int]:
    """Row tokens/s of the whole command and after its first finished shard (start-up excluded), and the rows,
    for the sample's train split."""
    argv = ["--dataset", args.dataset, "--tokenizer", args.tokenizer, "--out", out, "--splits", "train",
            "--max_length", str(args.max_length), "--workers", str(workers)]
    finished: list[float] = []
    start = time.perf_counter()
    meta = pretokenize.pretokenize(pretokenize.build_parser().parse_args(argv),
                                   on_shard_done=lambda split, index: finished.append(time.perf_counter()))
    whole = time.perf_counter() - start
    shards = meta["splits"]["train"]["shards"]
    rows = meta["splits"]["train"]["rows"]
    steady = sum(s["rows"] for s in shards[1:]) * args.max_length / max(finished[-1] - finished[0], 1e-9)
    return rows * args.max_length / whole, steady, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/c4_sample")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64, help="micro-batch (rows)")
    parser.add_argument("--total_batch_size", type=int, default=512, help="global batch of the pretokenized reader")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per streaming/pretokenized measurement")
    parser.add_argument("--skip_pretokenizer", action="store_true", help="do not time the pretokenizer itself")
    args = parser.parse_args()
    tokenizer = data.load_tokenizer(args.tokenizer, args.max_length)
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; rows of {args.max_length} tokens, "
          f"micro-batch {args.batch_size}; demand of one H100 (estimate): 60M {DEMAND['60M'] / 1e6:.1f}M, "
          f"130M {DEMAND['130M'] / 1e6:.1f}M row tokens/s", flush=True)
    results: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        one = os.path.join(tmp, "one_worker")
        if args.skip_pretokenizer:
            pretokenize.pretokenize(pretokenize.build_parser().parse_args(
                ["--dataset", args.dataset, "--tokenizer", args.tokenizer, "--out", one, "--splits", "train",
                 "--max_length", str(args.max_length)]))
        else:
            for workers, out in ((1, one), (2, os.path.join(tmp, "two_workers"))):
                whole, steady, rows = run_pretokenizer(args, out, workers)
                name = f"pretokenizer, {workers} worker{'s' if workers > 1 else ''}"
                results.append((f"{name}, whole command ({rows:,} rows)", whole))
                results.append((f"{name}, after the first shard", steady))
        stream_paper = streaming(args, tokenizer, packing=False)
        results.insert(0, ("streaming, paper mode (one padded document per row)", stream_paper))
        results.insert(1, ("streaming, --packing", streaming(args, tokenizer, packing=True)))
        rows = pretokenized_rows(args, tokenizer, one)
        results.insert(2, (f"pretokenized rows (global batch {args.total_batch_size}, one rank)", rows))
    width = max(len(name) for name, _ in results)
    print(f"\n{'supply to one rank':<{width}}  {'row tokens/s':>14}  {'/ 60M demand':>12}  {'/ 130M demand':>13}")
    for name, rate in results:
        print(f"{name:<{width}}  {rate:>14,.0f}  {rate / DEMAND['60M']:>11.2f}x  {rate / DEMAND['130M']:>12.2f}x")
    print(f"\npretokenized / streaming (paper mode), same run: {rows / stream_paper:.0f}x; target: pretokenized "
          f">= 20x the 60M demand: {'met' if rows >= 20 * DEMAND['60M'] else 'NOT met'} "
          f"({rows / DEMAND['60M']:.1f}x)")


if __name__ == "__main__":
    main()
