"""C4 in C4's own layout, from the hub or a local directory, streamed, split per rank and resumable exactly.

Sources. `--dataset` is either a hub dataset (`allenai/c4`, read as `hf://datasets/allenai/c4`) or a local
directory; both hold `<config>/c4-train.XXXXX-of-NNNNN.json.gz` and `<config>/c4-validation.*.json.gz` JSON-lines
shards with a `text` field, and both are read by the same code (`datasets.load_dataset("json", streaming=True)`).

Order. The shard list is permuted with `--data_seed` (+ the epoch), split across ranks with
`datasets.distributed.split_dataset_by_node` (whole shards when their number divides by the world size), and
documents pass through a shuffle buffer of `--shuffle_buffer` documents. No DataLoader workers: each rank reads
its own shards once per epoch in one background thread, so no example is read twice or skipped.

Resume. The stream's state is the HF iterator state (shard and offset), the shuffle buffer's contents and RNG
state, the epoch and, when packing, the tokens carried into the next row. It is small (about 2 MB of text for the
default buffer) and saved with every checkpoint, so a resumed run sees exactly the batches it would have seen.
(datasets' own `shuffle()` cannot do this: its state drops the buffer contents.)

A flaky hub. huggingface_hub retries each HTTP request itself (5 times, 1 to 8 s apart, or as Retry-After says);
when it gives up, the error reaches the stream. For remote shards the stream then waits (1 s, doubling to 60 s,
logged), re-opens the dataset at its state after the last document it yielded (the shard and the row within it:
datasets re-reads that shard and skips the rows already yielded) and goes on, so the documents are exactly those
of a run without the fault. After `retry_seconds` without a document it raises `HubUnavailable`, on which the
trainer saves a checkpoint and stops (exit code 75).

Rows. Paper mode: one document per row, tokenised, eos-terminated, truncated to `--max_length` and right-padded
with the pad id; labels are -100 at pads. `--packing`: documents concatenated, each followed by eos, cut into
full rows; every token is a label.
"""

from __future__ import annotations

import copy
import os
import queue
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from alphadecay.errors import HubUnavailable, UserError

IGNORE_INDEX = -100
SHIPPED_DATASET = "data/c4_sample"
SHIPPED_TOKENIZER = "data/tokenizer"
OFFLINE_HINT = (f"To run without the hub, pass a local directory in C4 layout: --dataset {SHIPPED_DATASET} (the small "
                f"sample shipped in this repository) or a mirror of allenai/c4, and a local tokenizer: "
                f"--tokenizer {SHIPPED_TOKENIZER} (shipped) or a saved copy of t5-base.")


# ------------------------------------------------------------------------------------------------------------
# Where the shards are
# ------------------------------------------------------------------------------------------------------------
def is_hub_name(name: str) -> bool:
    """A hub id looks like `owner/name` or `name` and is not an existing local path."""
    return not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def check_hub_reachable(what: str, timeout: float = 5.0, hint: str = OFFLINE_HINT) -> None:
    """Fail within seconds, naming the local alternatives (`hint`), when the Hugging Face hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(f"{what} needs the Hugging Face hub, but HF_HUB_OFFLINE is set. {hint}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    url = urllib.parse.urlparse(proxy or endpoint)  # behind a proxy, the proxy is what must answer
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"{what} needs the Hugging Face hub, which cannot be reached ({host}:{port}: {err}). "
                        f"{hint}") from None


def shard_pattern(config: str, split: str) -> str:
    return f"{config}/c4-{split}.*-of-*.json.gz"


def list_shards(dataset: str, config: str, split: str) -> list[str]:
    """Sorted shard paths (local paths or hf:// URLs) of one split, or a UserError that says what was expected."""
    pattern = shard_pattern(config, split)
    if is_hub_name(dataset):
        check_hub_reachable(f"--dataset {dataset}")
        from huggingface_hub import HfFileSystem

        try:
            found = HfFileSystem().glob(f"datasets/{dataset}/{pattern}")
        except Exception as err:  # noqa: BLE001 - the hub's errors are many; all mean the same to the user
            raise UserError(f"--dataset {dataset}: listing {pattern} on the hub failed ({type(err).__name__}: {err}). "
                            f"{OFFLINE_HINT}") from None
        files = sorted(f"hf://{path}" for path in found)
    else:
        if not os.path.isdir(dataset):
            raise UserError(f"--dataset {dataset}: no such directory, and not a hub dataset name. "
                            f"Give a hub dataset in C4 layout (allenai/c4) or a local directory holding {pattern}.")
        root = os.path.join(dataset, config)
        files = sorted(os.path.join(root, f) for f in os.listdir(root)
                       if re.fullmatch(rf"c4-{split}\.\d+-of-\d+\.json\.gz", f)) if os.path.isdir(root) else []
    if not files:
        raise UserError(f"--dataset {dataset}: no {split} shards matching {pattern} (C4 layout, with "
                        f"--dataset_config {config}). Expected files like {config}/c4-{split}.00000-of-01024.json.gz "
                        f"holding JSON lines with a 'text' field.")
    return files


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------
def load_tokenizer(name: str, max_length: int):
    """A local tokenizer directory, or a hub tokenizer (t5-base by default) after a quick reachability check."""
    from transformers import AutoTokenizer

    if is_hub_name(name):
        check_hub_reachable(f"--tokenizer {name}")
    elif not os.path.isdir(name):
        raise UserError(f"--tokenizer {name}: no such directory, and not a hub tokenizer name. "
                        f"Give a saved tokenizer directory (e.g. {SHIPPED_TOKENIZER}) or a hub name (t5-base).")
    try:
        return AutoTokenizer.from_pretrained(name, model_max_length=max_length)
    except (OSError, ValueError) as err:
        raise UserError(f"--tokenizer {name} could not be loaded ({err}).") from None


def check_tokenizer_fits(tokenizer, vocab_size: int, tokenizer_name: str, model_config: str) -> None:
    """Every id the tokenizer can produce from text (plus pad and eos) must index the model's embedding.

    Added special tokens that text never produces are allowed beyond the vocabulary: t5-base has 32,100 ids
    (100 `<extra_id_*>` sentinels) against the paper's 32,000-row embedding, and we tokenise with
    `split_special_tokens=True`, so a literal sentinel in the text is split into ordinary pieces.
    """
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special -= {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    reachable = [i for i in tokenizer.get_vocab().values() if i not in special]
    reachable += [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None]
    largest = max(reachable)
    if largest >= vocab_size:
        raise UserError(f"--tokenizer {tokenizer_name} produces token ids up to {largest}, but --model_config "
                        f"{model_config} has vocab_size {vocab_size}. Use a config whose vocab_size is at least "
                        f"{largest + 1} (e.g. configs/llama_60m.json for t5-base, configs/llama_3m.json for "
                        f"{SHIPPED_TOKENIZER}) or a matching tokenizer.")
    if tokenizer.eos_token_id is None:
        raise UserError(f"--tokenizer {tokenizer_name} has no eos token; documents must be eos-terminated.")


@dataclass(frozen=True)
class RowSpec:
    """How documents become rows of token ids."""

    max_length: int
    pad_id: int
    eos_id: int
    packing: bool
    appends_eos: bool  # does the tokenizer already end every encoding with eos (T5 does)?

    @classmethod
    def from_tokenizer(cls, tokenizer, max_length: int, packing: bool) -> RowSpec:
        probe = tokenizer("probe")["input_ids"]
        pad = tokenizer.pad_token_id
        if not packing and (pad is None or pad == tokenizer.eos_token_id):
            raise UserError("the tokenizer has no pad token distinct from eos, which the paper's padded rows need; "
                            "use --packing or a tokenizer with one (t5-base has pad 0, eos 1).")
        return cls(max_length, pad if pad is not None else tokenizer.eos_token_id, tokenizer.eos_token_id, packing,
                   appends_eos=bool(probe) and probe[-1] == tokenizer.eos_token_id)


def encode_documents(tokenizer, texts: list[str], spec: RowSpec) -> list[list[int]]:
    """Token ids of each document, eos-terminated; truncated to max_length (eos kept) unless packing."""
    encoded = tokenizer(texts, add_special_tokens=True, split_special_tokens=True,
                        truncation=not spec.packing and spec.appends_eos,
                        max_length=spec.max_length if not spec.packing else None)["input_ids"]
    if not spec.appends_eos:
        encoded = [ids + [spec.eos_id] for ids in encoded]
    if not spec.packing:
        encoded = [ids if len(ids) <= spec.max_length else ids[: spec.max_length - 1] + [spec.eos_id] for ids in encoded]
    return encoded


def pad_rows(encoded: list[list[int]], spec: RowSpec) -> torch.Tensor:
    rows = torch.full((len(encoded), spec.max_length), spec.pad_id, dtype=torch.long)
    for i, ids in enumerate(encoded):
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rows


def labels_for(input_ids: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    """Next-token labels aligned with input_ids (the shift happens in the loss): pads ignored in paper mode."""
    if spec.packing:
        return input_ids.clone()
    labels = input_ids.clone()
    labels[input_ids == spec.pad_id] = IGNORE_INDEX
    return labels


# ------------------------------------------------------------------------------------------------------------
# Documents: a resumable, shuffled, per-rank stream
# ------------------------------------------------------------------------------------------------------------
def is_remote(path: str) -> bool:
    return "://" in path


def is_transient(err: BaseException) -> bool:
    """Could reading a remote shard again succeed? Connection and timeout errors, HTTP 408/429/5xx answers, and
    FileNotFoundError (datasets reports a hub that answered 5xx while it resolved a file as a missing file; the
    shards were listed at the start, so they exist): yes. Other HTTP answers (401, 403, 404), a refused permission
    or any other error (a bug, bad data): no."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (OSError, TimeoutError)):  # ConnectionError ("Server Disconnected" from datasets) included
        return True
    return type(err).__module__.split(".")[0] in ("httpx", "httpx2", "aiohttp", "requests", "urllib3", "fsspec")


class Backoff:
    """Waits between attempts to read a remote source: 1 s, doubling to `max_wait`; gives up (HubUnavailable) once
    `limit` seconds have passed since the last success. Each wait is logged to stderr."""

    def __init__(self, limit: float, what: str, max_wait: float = 60.0):
        self.limit, self.what, self.max_wait = limit, what, max_wait
        self.since: float | None = None
        self.attempts = 0

    def succeeded(self) -> None:
        self.since, self.attempts = None, 0

    def wait(self, err: BaseException) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        self.attempts += 1
        failed_for = now - self.since
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if failed_for >= self.limit:
            raise HubUnavailable(
                f"{self.what} could not be read for {failed_for:.0f} s ({self.attempts} attempt(s), each after "
                f"huggingface_hub's own retries; last error {cause}); --hub_retry_seconds is {self.limit:g}.")
        delay = min(self.max_wait, 2.0 ** (self.attempts - 1), max(0.0, self.limit - failed_for))
        print(f"warning: {self.what}: reading failed ({cause}); retry {self.attempts} in {delay:.0f} s, giving up "
              f"after {self.limit:g} s without data", file=sys.stderr, flush=True)
        time.sleep(delay)


class DocumentStream:
    """Texts of one split for one rank, shuffled, endless (epochs) or one pass; exactly resumable. Remote shards
    are re-opened where they broke after a read error, for up to `retry_seconds` (module docstring)."""

    def __init__(self, files: list[str], *, rank: int, world_size: int, seed: int, buffer_size: int,
                 shuffle: bool = True, repeat: bool = True, retry_seconds: float = 600.0):
        self.files, self.rank, self.world_size = files, rank, world_size
        self.seed, self.buffer_size, self.shuffle, self.repeat = seed, buffer_size, shuffle, repeat
        self.remote = any(is_remote(f) for f in files)
        self.retry_seconds = retry_seconds
        self._epoch = 0
        self._hf_state: dict | None = None
        self._buffer: list[str] = []
        self._rng = np.random.default_rng(seed)
        self._dataset = None

    def _open(self):
        import datasets
        from datasets.distributed import split_dataset_by_node

        files = list(self.files)
        if self.shuffle:
            random.Random(self.seed + self._epoch).shuffle(files)
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        ds = ds.select_columns(["text"])
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)

    def _texts(self) -> Iterator[str]:
        """This epoch's texts from the HF iterator, from `_hf_state` on; a remote source that fails is re-opened at
        the state after the last text yielded, with backoff."""
        where = f"rank {self.rank}: the training data" if self.world_size > 1 else "the data"
        backoff = Backoff(self.retry_seconds, f"{where} ({os.path.dirname(self.files[0])})")
        while True:
            try:
                self._dataset = self._open()
                if self._hf_state is not None:
                    self._dataset.load_state_dict(self._hf_state)
                for example in self._dataset:
                    if backoff.attempts:
                        backoff.succeeded()
                    yield example["text"]
                return
            except Exception as err:
                if not (self.remote and is_transient(err)):
                    raise
                if self._dataset is not None:  # the position after the last text yielded
                    self._hf_state = self._dataset.state_dict()
                self._dataset = None
                backoff.wait(err)

    def __iter__(self) -> Iterator[str]:
        while True:
            for text in self._texts():
                if not self.shuffle:
                    yield text
                elif len(self._buffer) < self.buffer_size:
                    self._buffer.append(text)
                else:
                    i = int(self._rng.integers(self.buffer_size))
                    out, self._buffer[i] = self._buffer[i], text
                    yield out
            while self._buffer:  # end of the epoch: drain the buffer in random order
                yield self._buffer.pop(int(self._rng.integers(len(self._buffer))))
            self._epoch, self._hf_state, self._dataset = self._epoch + 1, None, None
            if not self.repeat:
                return

    def state_dict(self) -> dict[str, Any]:
        hf_state = self._dataset.state_dict() if self._dataset is not None else self._hf_state
        return {"epoch": self._epoch, "hf_state": copy.deepcopy(hf_state), "buffer": list(self._buffer),
                "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._hf_state, self._buffer = state["epoch"], state["hf_state"], list(state["buffer"])
        self._rng.bit_generator.state = state["rng"]
        self._dataset = None


class TokenBatches:
    """Batches of (input_ids, labels), each of shape (batch_size, max_length), with the stream state after each."""

    def __init__(self, documents: DocumentStream, tokenizer, spec: RowSpec, batch_size: int):
        self.documents, self.tokenizer, self.spec, self.batch_size = documents, tokenizer, spec, batch_size
        self._carry: list[int] = []  # packing: tokens of the next row(s)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        docs = iter(self.documents)
        rows_needed = self.batch_size * self.spec.max_length
        while True:
            if self.spec.packing:
                while len(self._carry) < rows_needed:
                    texts = [t for _, t in zip(range(self.batch_size), docs)]
                    if not texts:
                        return
                    for ids in encode_documents(self.tokenizer, texts, self.spec):
                        self._carry.extend(ids)
                input_ids = torch.tensor(self._carry[:rows_needed], dtype=torch.long).view(self.batch_size, -1)
                self._carry = self._carry[rows_needed:]
            else:
                texts = [t for _, t in zip(range(self.batch_size), docs)]
                if not texts:
                    return
                input_ids = pad_rows(encode_documents(self.tokenizer, texts, self.spec), self.spec)
            yield {"input_ids": input_ids, "labels": labels_for(input_ids, self.spec)}, self.state_dict()

    @property
    def remote(self) -> bool:
        """Read from the hub, so that reading can fail for a while (HubUnavailable) on one rank and not another."""
        return getattr(self.documents, "remote", False)

    def state_dict(self) -> dict[str, Any]:
        return {"documents": self.documents.state_dict(), "carry": list(self._carry)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.documents.load_state_dict(state["documents"])
        self._carry = list(state["carry"])


class Prefetcher:
    """Runs a batch iterator in a background thread, `depth` batches ahead of the trainer.

    For a CUDA `device` the thread also copies each item's tensors into pinned (page-locked) host memory, so the
    trainer's `.to(device, non_blocking=True)` is an asynchronous copy that overlaps the GPU's work rather than a
    synchronous one through a staging buffer. The thread first makes `device` its current GPU, as DataLoader's
    pinning thread does: a new thread starts on GPU 0, where pinning would open a context for every rank. Other
    devices get the items as the source yields them."""

    _END = object()

    def __init__(self, source, depth: int = 4, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = self.device is not None and self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source) -> None:
        try:
            if self.pin_memory and self.device.index is not None:
                torch.cuda.set_device(self.device)
            for item in source:
                if self.pin_memory:
                    item = pytree.tree_map_only(torch.Tensor, lambda t: t.pin_memory(), item)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer thread
            self._queue.put(err)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer and wait for it: a daemon thread still inside the tokenizer or the JSON reader when
        the interpreter exits can abort the process."""
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
            timeout -= 0.1
            if timeout <= 0:
                break


# ------------------------------------------------------------------------------------------------------------
# Evaluation set
# ------------------------------------------------------------------------------------------------------------
def build_eval_rows(files: list[str], tokenizer, spec: RowSpec, *, target_tokens: int,
                    docs_per_chunk: int = 256, retry_seconds: float = 600.0) -> tuple[torch.Tensor, bool]:
    """The evaluation set: (rows, exhausted), rows an int32 (N, max_length) tensor, the same on every rank.

    The validation rows in source order (shards sorted by file name, documents in file order, no shuffle), made
    as training rows are (paper mode: one eos-terminated, truncated, right-padded document per row; --packing:
    documents concatenated and cut into full rows, the incomplete last row dropped). N is the shortest prefix
    whose real tokens (non-pad in paper mode, all when packing) reach `target_tokens`; if the split has fewer,
    all of it, and exhausted is True. Nothing here depends on the world size, the batch size or a seed, so every
    layout evaluates the same rows; ranks divide them by row (`alphadecay.evaluate.evaluate_rows`). Built once
    and kept in memory (the official code re-streams a seed-42 shuffle of the split, split by rank, every time).
    """
    documents = iter(DocumentStream(files, rank=0, world_size=1, seed=0, buffer_size=1, shuffle=False, repeat=False,
                                    retry_seconds=retry_seconds))

    def chunks() -> Iterator[torch.Tensor]:  # the split's rows, docs_per_chunk documents at a time
        carry: list[int] = []
        while texts := [t for _, t in zip(range(docs_per_chunk), documents)]:
            encoded = encode_documents(tokenizer, texts, spec)
            if not spec.packing:
                yield pad_rows(encoded, spec).to(torch.int32)
                continue
            carry.extend(t for ids in encoded for t in ids)
            full = len(carry) // spec.max_length * spec.max_length
            yield torch.tensor(carry[:full], dtype=torch.int32).view(-1, spec.max_length)
            carry = carry[full:]

    return first_rows_reaching(chunks(), spec, target_tokens)


def first_rows_reaching(chunks: Iterable[torch.Tensor], spec: RowSpec, target_tokens: int) -> tuple[torch.Tensor, bool]:
    """(rows, exhausted): the shortest prefix of the rows in `chunks` (row blocks, read only as far as needed) whose
    real tokens (non-pad in paper mode, all when packing) reach `target_tokens`; all of them, with exhausted True,
    when they hold fewer. The evaluation set's cut, for streamed and pretokenized rows alike."""
    rows: list[torch.Tensor] = []
    tokens = 0
    for chunk in chunks:
        real = torch.full((len(chunk),), spec.max_length) if spec.packing else (chunk != spec.pad_id).sum(dim=1)
        cumulative = tokens + real.cumsum(0)
        keep = int((cumulative < target_tokens).sum()) + 1  # rows up to the first that reaches the target
        rows.append(chunk[:keep])
        tokens = int(cumulative[min(keep, len(chunk)) - 1]) if len(chunk) else tokens
        if tokens >= target_tokens:
            break
    out = torch.cat(rows) if rows else torch.empty(0, spec.max_length, dtype=torch.int32)
    return out, tokens < target_tokens
