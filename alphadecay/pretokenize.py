"""Tokenize C4 once, ahead of training, into memory-mapped rows (read back by alphadecay/pretokenized.py).

    python -m alphadecay.pretokenize --dataset data/c4_sample --tokenizer data/tokenizer --out runs/c4_sample_256
    python -m alphadecay.pretokenize --dataset allenai/c4 --tokenizer t5-base --out /data/c4_t5_256 \
        --max_rows 5120000 --workers 16          # the 60M runs' 10k updates of 512 rows, ≈2.6 GB
    python torchrun_main.py --dataset /data/c4_t5_256 --tokenizer /data/c4_t5_256/tokenizer ...

Rows. Exactly those the streaming path makes for the same documents: `data.encode_documents` (same tokenization,
eos, truncation), `data.pad_rows` (right-padding with the pad id) or, with `--packing`, documents concatenated and
cut into full rows with the carry running across documents and shards. Stored in source order (shards sorted by
name, documents in file order); training shuffles with its own permutation.

Work. One task per source shard, run by `--workers` processes (1 = in this process). Shards are finished in source
order: a worker writes its shard's rows (paper mode) or flat token stream (packing) to a temporary file, and this
process, taking results in order, applies the packing carry and the `--max_rows` cut and renames the finished shard
into place. So the output is the same for any number of workers. `--max_rows N` (or `--max_tokens N`, i.e.
N / max_length rows) keeps the first N rows of each split; a worker stops reading as soon as its shard cannot
contribute more.

Resume. `pretokenized.json` is rewritten after every finished shard; run the same command again after an
interruption and the finished shards are kept. Different settings for an existing directory are refused.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from alphadecay import data
from alphadecay.config import parse_token_count
from alphadecay.errors import UserError
from alphadecay.pretokenized import FORMAT, META_FILE, VERSION, dtype_for, vocab_hash

CHUNK_DOCUMENTS = 512  # documents per tokenizer call (the batch tokenizer parallelises within a call)


# ------------------------------------------------------------------------------------------------------------
# Worker side: one source shard -> a temporary file
# ------------------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_name: str, max_length: int, packing: bool, threads: int, progress, stop) -> None:
    """Runs once in each worker process: the tokenizer's thread pool sized so workers do not oversubscribe cores."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    tokenizer = data.load_tokenizer(tokenizer_name, max_length)
    _WORKER.update(tokenizer=tokenizer, spec=data.RowSpec.from_tokenizer(tokenizer, max_length, packing),
                   progress=progress.put, stopped=stop.is_set)


def _documents(source: str, chunk: int):
    """Texts of one shard in file order, `chunk` at a time, read the way the streaming path reads them."""
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=[source], split="train", streaming=True)
    for batch in dataset.select_columns(["text"]).iter(batch_size=chunk):
        yield batch["text"]


def tokenize_shard(task: dict[str, Any]) -> dict[str, int]:
    """Write the rows (paper mode) or the token stream (packing) of one shard to task['tmp'].

    `task['max_rows']` bounds what the shard can contribute (None: all of it): reading stops once the shard holds
    that many rows, or that many rows' worth of tokens when packing.
    """
    tokenizer, spec, report = _WORKER["tokenizer"], _WORKER["spec"], _WORKER["progress"]
    dtype, cap = np.dtype(task["dtype"]), task["max_rows"]
    rows = tokens = documents = 0
    lengths: list[int] = []  # packing: tokens of each document, to count the documents a --max_rows cut keeps
    try:
        with open(task["tmp"], "wb") as out:
            for texts in _documents(task["source"], CHUNK_DOCUMENTS):
                encoded = data.encode_documents(tokenizer, texts, spec)
                if spec.packing:
                    if cap is not None:  # keep documents until the shard holds cap rows' worth of tokens
                        ends = tokens + np.cumsum([len(ids) for ids in encoded])
                        encoded = encoded[: int(np.searchsorted(ends, cap * spec.max_length)) + 1]
                    lengths += [len(ids) for ids in encoded]
                    flat = np.fromiter((t for ids in encoded for t in ids), dtype=dtype)
                    out.write(flat.tobytes())
                    report((tokens + len(flat)) // spec.max_length - tokens // spec.max_length)
                    tokens += len(flat)
                    full = cap is not None and tokens >= cap * spec.max_length
                else:
                    encoded = encoded[: cap - rows] if cap is not None else encoded
                    out.write(data.pad_rows(encoded, spec).numpy().astype(dtype).tobytes())
                    rows += len(encoded)
                    report(len(encoded))
                    full = cap is not None and rows >= cap
                documents += len(encoded)
                if full or _WORKER["stopped"]():
                    break
    except (OSError, EOFError, ValueError) as err:  # a truncated gzip, bad JSON, no 'text': name the shard
        raise UserError(f"--dataset: reading {task['source']} failed ({type(err).__name__}: {err}).") from None
    return {"rows": rows, "tokens": tokens, "documents": documents, "lengths": lengths}


# ------------------------------------------------------------------------------------------------------------
# Main side: tasks in flight, results finished in source order
# ------------------------------------------------------------------------------------------------------------
class _Inline:
    """--workers 1: run each task here, when its result is asked for."""

    def __init__(self, tokenizer, spec: data.RowSpec):
        self.bar = None
        _WORKER.update(tokenizer=tokenizer, spec=spec, progress=lambda n: _advance(self.bar, n), stopped=lambda: False)

    def submit(self, task):
        return lambda: tokenize_shard(task)

    def cancel(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Pool:
    """--workers K > 1: K spawned processes (no fork: the tokenizer's threads do not survive one)."""

    def __init__(self, workers: int, args):
        self.workers, self.args, self.bar = workers, args, None
        self.context = multiprocessing.get_context("spawn")
        self.queue, self.stop = self.context.Queue(), self.context.Event()
        self.pool, self.pending = None, []

    def submit(self, task):
        if self.pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self.pool = self.context.Pool(self.workers, initializer=_init_worker, initargs=(
                self.args.tokenizer, self.args.max_length, self.args.packing, threads, self.queue, self.stop))
        pending = self.pool.apply_async(tokenize_shard, (task,))
        self.pending.append(pending)

        def result():
            while not pending.ready():
                pending.wait(0.2)
                self._drain()
            self._drain()
            return pending.get()

        return result

    def _drain(self) -> None:
        done = 0
        while not self.queue.empty():
            done += self.queue.get()
        if done:
            _advance(self.bar, done)

    def cancel(self) -> None:
        """Stop the shards in flight past --max_rows: each worker returns after its current chunk, and the pool
        goes on with the next split."""
        self.stop.set()
        for pending in self.pending:
            pending.wait()
        self.pending = []
        self._drain()
        self.stop.clear()

    def abort(self) -> None:
        """An error or an interruption: end the workers now (a worker hit by Ctrl-C never returns its task)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        self.pool, self.pending = None, []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        self.queue.close()
        self.queue.join_thread()


def _advance(bar, rows: int) -> None:
    """Count rows on the bar, never past --max_rows (shards in flight may read a little beyond it)."""
    bar.update(rows if bar.total is None else max(0, min(rows, bar.total - bar.n)))


def _write_json(path: str, obj: dict) -> None:
    import json

    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def _human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:,.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return ""


def _settings(args, tokenizer, spec: data.RowSpec, dtype: str) -> dict[str, Any]:
    """What a directory's rows depend on; resuming with different values is refused."""
    return {"format": FORMAT, "version": VERSION, "tokenizer": args.tokenizer,
            "tokenizer_vocab_hash": vocab_hash(tokenizer), "vocab_size": len(tokenizer), "pad_id": spec.pad_id,
            "eos_id": spec.eos_id, "appends_eos": spec.appends_eos, "max_length": args.max_length,
            "packing": args.packing, "dtype": dtype, "source": args.dataset, "dataset_config": args.dataset_config}


def _load_or_start(args, settings: dict[str, Any]) -> dict[str, Any]:
    import json

    path = os.path.join(args.out, META_FILE)
    if not os.path.exists(path):
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UserError(f"--out {args.out} exists and is not empty, but holds no {META_FILE}; choose a new or "
                            f"empty directory.")
        return {**settings, "splits": {}}
    with open(path) as fh:
        meta = json.load(fh)
    keys = ("format", "version", "tokenizer_vocab_hash", "max_length", "packing", "dtype", "source", "dataset_config")
    changed = [f"{k}: {meta.get(k)!r} there, {settings[k]!r} now" for k in keys if meta.get(k) != settings[k]]
    if changed:
        raise UserError(f"--out {args.out} holds pretokenized data made with other settings ({'; '.join(changed)}); "
                        f"choose another --out, or delete it to start over.")
    return meta


def pretokenize(args, on_shard_done: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run the command; returns the metadata written. `on_shard_done(split, index)` is called after each shard
    is in place (tests use it to interrupt a run at a known point)."""
    from tqdm.auto import tqdm

    if args.max_rows is not None and args.max_tokens is not None:
        raise UserError("give --max_rows or --max_tokens, not both.")
    limit = args.max_rows if args.max_tokens is None else math.ceil(parse_token_count(args.max_tokens) / args.max_length)
    if limit is not None and limit <= 0:
        raise UserError(f"--max_rows/--max_tokens must give at least one row (got {limit}).")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}.")
    splits = [s for s in args.splits.split(",") if s]
    if not splits or any(s not in ("train", "validation") for s in splits):
        raise UserError(f"--splits {args.splits}: a comma-separated subset of train,validation.")
    tokenizer = data.load_tokenizer(args.tokenizer, args.max_length)
    spec = data.RowSpec.from_tokenizer(tokenizer, args.max_length, args.packing)
    sources = {split: data.list_shards(args.dataset, args.dataset_config, split) for split in splits}
    dtype = dtype_for(tokenizer)
    settings = _settings(args, tokenizer, spec, dtype)
    os.makedirs(args.out, exist_ok=True)
    meta = _load_or_start(args, settings)
    for name in os.listdir(args.out):  # leftovers of an interrupted run
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(args.out, name))
    row_bytes = args.max_length * np.dtype(dtype).itemsize
    if limit is not None:
        need = limit * row_bytes * len(splits)
        free = shutil.disk_usage(args.out).free
        print(f"disk: at most {_human(need)} ({limit:,} rows of {args.max_length} {dtype} tokens per split); "
              f"{_human(free)} free in {args.out}", flush=True)
        if need > free:
            raise UserError(f"--out {args.out}: {_human(need)} may be needed but only {_human(free)} is free; free "
                            f"space or lower --max_rows.")
    if not os.path.isdir(os.path.join(args.out, "tokenizer")):
        tokenizer.save_pretrained(os.path.join(args.out, "tokenizer"))  # train with --tokenizer OUT/tokenizer
    runner = _Inline(tokenizer, spec) if args.workers == 1 else _Pool(args.workers, args)
    try:
        for split in splits:
            _run_split(args, runner, split, sources[split], meta, spec, dtype, limit, row_bytes, on_shard_done, tqdm)
    finally:
        runner.close()
    for split in splits:
        info = meta["splits"][split]
        print(f"{split}: {info['rows']:,} rows from {info['documents']:,} documents in {len(info['shards'])} "
              f"shard(s), {_human(info['rows'] * row_bytes)}", flush=True)
    print(f"wrote {os.path.join(args.out, META_FILE)}; train with --dataset {args.out} --tokenizer "
          f"{os.path.join(args.out, 'tokenizer')} --max_length {args.max_length}{' --packing' if args.packing else ''}",
          flush=True)
    return meta


def _run_split(args, runner, split: str, sources: list[str], meta: dict, spec: data.RowSpec, dtype: str,
               limit: int | None, row_bytes: int, on_shard_done, tqdm) -> None:
    meta_path = os.path.join(args.out, META_FILE)
    info = meta["splits"].get(split)
    if info is not None and (info["source_shards"] != sources or info["max_rows"] != limit):
        raise UserError(f"--out {args.out}: its {split} split was made from other shards or another row limit "
                        f"(max_rows {info['max_rows']} there, {limit} now); choose another --out.")
    if info is None:
        info = meta["splits"][split] = {"source_shards": sources, "max_rows": limit, "complete": False, "rows": 0,
                                        "documents": 0, "all_documents": False, "shards": []}
    if info["complete"]:
        print(f"{split}: already complete ({info['rows']:,} rows)", flush=True)
        return
    kept = len(info["shards"])
    if kept:
        print(f"{split}: resuming after {kept} finished shard(s) ({info['rows']:,} rows kept)", flush=True)
    carry = np.array(info["shards"][-1]["carry"] if kept else [], dtype=dtype)
    bar = tqdm(total=limit, initial=info["rows"], unit="rows", desc=split, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    runner.bar = bar
    inflight: deque = deque()
    next_index, estimated = kept, False
    try:
        while True:
            # Up to two shards per worker in flight: results are taken in source order, and a worker that finished
            # early goes on with the next shard meanwhile.
            while (len(inflight) < (1 if args.workers == 1 else 2 * args.workers) and next_index < len(sources)
                   and (limit is None or info["rows"] < limit)):
                tmp = os.path.join(args.out, f".{split}-{next_index:05d}.{'tokens' if spec.packing else 'bin'}.tmp")
                task = {"source": sources[next_index], "tmp": tmp, "dtype": dtype,
                        "max_rows": None if limit is None else limit - info["rows"]}
                inflight.append((next_index, tmp, runner.submit(task)))
                next_index += 1
            if not inflight:
                break
            index, tmp, result = inflight.popleft()
            done = result()
            final = os.path.join(args.out, f"{split}-{index:05d}.bin")
            room = None if limit is None else limit - info["rows"]
            if spec.packing:
                tokens = np.concatenate([carry, np.fromfile(tmp, dtype=dtype)])
                rows = len(tokens) // spec.max_length if room is None else min(len(tokens) // spec.max_length, room)
                tokens[: rows * spec.max_length].tofile(final + ".tmp")
                if room is not None and rows == room:  # the cut: count the documents whose tokens made it in
                    used = rows * spec.max_length - len(carry)
                    starts = np.cumsum([0] + done["lengths"][:-1])
                    done["documents"] = int(np.searchsorted(starts, used)) if used > 0 else 0
                    carry = tokens[:0]
                else:
                    carry = tokens[rows * spec.max_length:]
                os.remove(tmp)
                os.replace(final + ".tmp", final)
            else:
                rows = done["rows"] if room is None else min(done["rows"], room)
                os.truncate(tmp, rows * row_bytes)
                os.replace(tmp, final)
                done["documents"] = rows
            info["shards"].append({"file": os.path.basename(final), "source": sources[index], "rows": rows,
                                   "documents": done["documents"], "carry": carry.tolist() if spec.packing else []})
            info["rows"] += rows
            info["documents"] += done["documents"]
            limit_reached = limit is not None and info["rows"] >= limit
            if limit_reached or (not inflight and next_index == len(sources)):
                info["complete"] = True
                info["all_documents"] = not limit_reached and index == len(sources) - 1
            _write_json(meta_path, meta)
            if limit is None and not estimated:
                estimated = True
                total = info["rows"] / (index + 1) * len(sources)
                bar.write(f"{split}: ≈{total:,.0f} rows ≈ {_human(total * row_bytes)} on disk (estimated from "
                          f"{index + 1} of {len(sources)} source shards); "
                          f"{_human(shutil.disk_usage(args.out).free)} free in {args.out}")
            if on_shard_done is not None:
                on_shard_done(split, index)
            if limit_reached:
                break
        if inflight:  # shards past the limit
            runner.cancel()
    except BaseException:
        runner.abort()
        raise
    finally:
        bar.close()
        for _, tmp, _ in inflight:  # shards past the limit, or an interruption
            if os.path.exists(tmp):
                os.remove(tmp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alphadecay.pretokenize", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", required=True, help="hub dataset in C4 layout (allenai/c4) or a local directory in C4 layout")
    parser.add_argument("--dataset_config", default="en", help="C4 variant: the sub-directory holding the shards")
    parser.add_argument("--tokenizer", required=True, help="hub tokenizer name (t5-base) or local tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory (created; an interrupted one is resumed)")
    parser.add_argument("--splits", default="train,validation", help="comma-separated splits to write")
    parser.add_argument("--max_rows", type=int, default=None, help="keep the first N rows of each split (default: all)")
    parser.add_argument("--max_tokens", default=None, help="keep the first N tokens (N / max_length rows) of each split, e.g. 1.3B")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per row (must equal training's --max_length)")
    parser.add_argument("--packing", action="store_true", help="concatenate documents into full rows (training's --packing)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = this process)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        pretokenize(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
