"""Pretokenized rows: read a directory made by `python -m alphadecay.pretokenize`, in one global order.

Why. Streaming C4 and tokenizing on the fly (alphadecay/data.py) is the paper's way, but one background thread per
rank cannot feed a GPU (about 270k row tokens/s on a 2-core CPU against the ≈1M/s one H100 consumes on 60M), and each
rank reads its own shards, so 1 and 2 GPUs train on different data and a checkpoint cannot change GPU count.
Tokenized once, ahead of training, a row costs a memory copy, and the batches can be fixed globally (as OLMo does).

Layout of DIR: `pretokenized.json` (META_FILE: format version, tokenizer name and vocabulary hash, pad/eos ids,
max_length, packing, dtype, source and shard lists, rows and documents per shard) and per split `<split>-NNNNN.bin`
files of raw rows, (rows, max_length) little-endian uint16 (uint32 when an id exceeds 65,535), memory-mapped. The
rows are exactly those the streaming path makes for the same documents (`data.encode_documents`, `data.pad_rows`,
the packing carry across documents and shards), stored in source order: shards sorted by name, documents in file
order. Shuffling is the training permutation's job.

Training order. Epoch e uses the permutation `default_rng([data_seed, e]).permutation(rows)`; update k of the epoch
trains on the G = --total_batch_size rows perm[kG:(k+1)G]; rank r of W takes the contiguous share
[rG/W, (r+1)G/W), cut into micro-batches of --batch_size. When fewer than G rows are left the tail is dropped and
the next epoch starts with a new permutation. The global batches therefore depend only on the data, the seed and G:
the token-mean loss is the same for any number of ranks and micro-batches (up to float summation order), and the
position saved in a checkpoint (updates, epoch, row within the epoch) resumes on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from alphadecay import data
from alphadecay.config import PRETOKENIZED_META
from alphadecay.errors import UserError

META_FILE = PRETOKENIZED_META
FORMAT = "alphadecay-pretokenized"
VERSION = 1


def is_pretokenized(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def vocab_hash(tokenizer) -> str:
    """sha256 of the token -> id map: two tokenizers with equal hashes turn text into the same ids."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return "sha256:" + hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def dtype_for(tokenizer) -> str:
    largest = max([*tokenizer.get_vocab().values(), tokenizer.pad_token_id or 0, tokenizer.eos_token_id or 0])
    return "uint16" if largest <= np.iinfo(np.uint16).max else "uint32"


class Split:
    """The rows of one split: memory-mapped shards behind one row index, in stored (source) order."""

    def __init__(self, name: str, arrays: list[np.ndarray], max_length: int):
        self.name, self.max_length = name, max_length
        self.arrays = [a for a in arrays if len(a)]
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at the given global indices, as a (len(indices), max_length) array (a copy)."""
        indices = np.asarray(indices, dtype=np.int64)
        dtype = self.arrays[0].dtype if self.arrays else np.uint16
        out = np.empty((len(indices), self.max_length), dtype=dtype)
        shard = np.searchsorted(self.ends, indices, side="right")
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.arrays[s][indices[mask] - self.starts[s]]
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in stored order."""
        return self.take(np.arange(start, min(stop, len(self))))


class Pretokenized:
    """A pretokenized directory, opened and checked: every listed shard exists and has exactly its rows' bytes."""

    def __init__(self, path: str):
        self.path = path
        meta_path = os.path.join(path, META_FILE)
        try:
            with open(meta_path) as fh:
                self.meta: dict[str, Any] = json.load(fh)
        except (OSError, ValueError) as err:
            raise UserError(f"--dataset {path}: {meta_path} cannot be read ({err}); pretokenize again "
                            f"(python -m alphadecay.pretokenize --out {path} ...).") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise UserError(f"--dataset {path}: {meta_path} is not {FORMAT} version {VERSION} (found "
                            f"{self.meta.get('format')} version {self.meta.get('version')}); pretokenize again.")
        self.max_length, self.packing = int(self.meta["max_length"]), bool(self.meta["packing"])
        self.splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        """The split's rows; an error naming the file when a shard is missing, unreadable or truncated."""
        if name in self.splits:
            return self.splits[name]
        info = self.meta["splits"].get(name)
        if info is None:
            raise UserError(f"--dataset {self.path} has no {name} split (it has {', '.join(self.meta['splits'])}); "
                            f"pretokenize it with --splits {name}.")
        if not info["complete"]:
            raise UserError(f"--dataset {self.path}: the {name} split is incomplete (the pretokenizer stopped after "
                            f"{len(info['shards'])} of {len(info['source_shards'])} source shards); run the same "
                            f"`python -m alphadecay.pretokenize` command again to finish it.")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        arrays = []
        for shard in info["shards"]:
            file = os.path.join(self.path, shard["file"])
            expected = shard["rows"] * self.max_length * dtype.itemsize
            try:
                with open(file, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                if size != expected:
                    raise UserError(f"--dataset {self.path}: shard {file} has {size:,} bytes, but its "
                                    f"{shard['rows']:,} rows of {self.max_length} {dtype.name} tokens need "
                                    f"{expected:,} (truncated or damaged); delete it and run the pretokenizer "
                                    f"again to rewrite it.")
                arrays.append(np.memmap(file, dtype=dtype, mode="r", shape=(shard["rows"], self.max_length))
                              if shard["rows"] else np.empty((0, self.max_length), dtype=dtype))
            except OSError as err:
                raise UserError(f"--dataset {self.path}: shard {file} cannot be read ({err}); run the pretokenizer "
                                f"again to rewrite it.") from None
        self.splits[name] = Split(name, arrays, self.max_length)
        return self.splits[name]

    def check_matches(self, tokenizer, tokenizer_name: str, spec: data.RowSpec) -> None:
        """The training flags must describe the stored rows: same tokenizer vocabulary, max_length and packing."""
        meta, made_by = self.meta, f"the rows in {self.path}"
        if vocab_hash(tokenizer) != meta["tokenizer_vocab_hash"]:
            raise UserError(
                f"--tokenizer {tokenizer_name} (vocabulary {vocab_hash(tokenizer)[:19]}, {len(tokenizer)} ids) is not "
                f"the tokenizer that made {made_by}: {meta['tokenizer']} (vocabulary "
                f"{meta['tokenizer_vocab_hash'][:19]}, {meta['vocab_size']} ids). Train with --tokenizer "
                f"{os.path.join(self.path, 'tokenizer')} (its saved copy), or pretokenize again with this tokenizer.")
        if spec.max_length != self.max_length:
            raise UserError(f"--max_length {spec.max_length} differs from {made_by}: max_length {self.max_length}. "
                            f"Train with --max_length {self.max_length}, or pretokenize again with --max_length "
                            f"{spec.max_length}.")
        if spec.packing != self.packing:
            raise UserError(f"--packing {str(spec.packing).lower()} differs from {made_by}: packing "
                            f"{str(self.packing).lower()}. Train with{'' if self.packing else 'out'} --packing, or "
                            f"pretokenize again {'with' if spec.packing else 'without'} --packing.")
        ids = (spec.pad_id, spec.eos_id, spec.appends_eos)
        stored = (meta["pad_id"], meta["eos_id"], meta["appends_eos"])
        if ids != stored:
            raise UserError(f"--tokenizer {tokenizer_name} has (pad id, eos id, appends eos) = {ids}, but {made_by} "
                            f"were made with {stored}; use the tokenizer saved in {os.path.join(self.path, 'tokenizer')}.")

    def train_batches(self, spec: data.RowSpec, *, seed: int, total_batch_size: int, batch_size: int, rank: int,
                      world_size: int) -> PretokenizedBatches:
        return PretokenizedBatches(self.split("train"), spec, seed=seed, total_batch_size=total_batch_size,
                                   batch_size=batch_size, rank=rank, world_size=world_size)


def open_dataset(path: str) -> Pretokenized:
    """The directory at `path`, its train and validation shards checked before any compute."""
    dataset = Pretokenized(path)
    for name in ("train", "validation"):
        dataset.split(name)
    return dataset


# ------------------------------------------------------------------------------------------------------------
# Training batches
# ------------------------------------------------------------------------------------------------------------
class PretokenizedBatches:
    """This rank's micro-batches of each global batch, with the data position after each update.

    Yields (batch, state) per micro-batch like `data.TokenBatches`; the state is the same on every rank and names
    the next global batch: {"kind": "pretokenized", "update", "epoch", "row" (next row of the epoch's permutation),
    "rows" (size of the split)}.
    """

    world_size_independent = True  # restore() may resume its position on any number of ranks

    def __init__(self, split: Split, spec: data.RowSpec, *, seed: int, total_batch_size: int, batch_size: int,
                 rank: int, world_size: int, announce: bool = True):
        if len(split) < total_batch_size:
            raise UserError(f"--dataset: the pretokenized {split.name} split has {len(split):,} rows, fewer than one "
                            f"global batch (--total_batch_size {total_batch_size}); pretokenize more rows "
                            f"(--max_rows) or lower --total_batch_size.")
        self.split, self.spec, self.seed = split, spec, seed
        self.total, self.micro, self.rank, self.world_size = total_batch_size, batch_size, rank, world_size
        self.share = total_batch_size // world_size  # run.gradient_accumulation checked that this divides
        self.announce = announce and rank == 0  # say when an epoch ends (rank 0, above the progress bar)
        self.update, self.epoch, self.row = 0, 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.split)))
        return self._perm[1]

    def global_batch(self) -> np.ndarray:
        """Row indices of the next update's global batch, advancing the position (and the epoch when needed)."""
        if self.row + self.total > len(self.split):
            if self.announce:
                from tqdm.auto import tqdm

                tqdm.write(f"data: epoch {self.epoch} of the pretokenized train split ends after update "
                           f"{self.update} ({len(self.split) - self.row:,} of {len(self.split):,} rows left, fewer "
                           f"than one global batch of {self.total}: dropped); epoch {self.epoch + 1} starts with "
                           f"update {self.update + 1}, in a new order")
            self.epoch, self.row = self.epoch + 1, 0
        rows = self.permutation(self.epoch)[self.row:self.row + self.total]
        self.update, self.row = self.update + 1, self.row + self.total
        return rows

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        while True:
            mine = self.global_batch()[self.rank * self.share:(self.rank + 1) * self.share]
            state = self.state_dict()
            input_ids = torch.from_numpy(self.split.take(mine).astype(np.int64))
            for chunk in input_ids.split(self.micro):
                yield {"input_ids": chunk, "labels": data.labels_for(chunk, self.spec)}, state

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "pretokenized", "update": self.update, "epoch": self.epoch, "row": self.row,
                "rows": len(self.split)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") != len(self.split):
            raise UserError(f"--continue_from: the checkpoint was trained on a pretokenized train split of "
                            f"{state.get('rows'):,} rows, but --dataset has {len(self.split):,}; resume with the same "
                            f"--dataset.")
        self.update, self.epoch, self.row = state["update"], state["epoch"], state["row"]


# ------------------------------------------------------------------------------------------------------------
# Evaluation set (the pretokenized side of the contract in CONTRACTS.md)
# ------------------------------------------------------------------------------------------------------------
def build_eval_rows(dataset: Pretokenized, spec: data.RowSpec, *, target_tokens: int,
                    chunk_rows: int = 4096) -> tuple[torch.Tensor, bool]:
    """(rows, exhausted): the first validation rows in stored order whose real tokens reach `target_tokens`.

    Real tokens are the non-pad ones in paper mode and all of them when packing, as in `data.build_eval_rows`; the
    rows are int64 like `data.pad_rows`. `exhausted` is True when the stored split holds fewer real tokens than the
    target (then all of it is returned). The same on every rank; the trainer divides it by row.
    """
    split = dataset.split("validation")
    chunks = (torch.from_numpy(split.read(start, start + chunk_rows).astype(np.int64))
              for start in range(0, len(split), chunk_rows))
    rows, exhausted = data.first_rows_reaching(chunks, spec, target_tokens)
    return rows.long(), exhausted
