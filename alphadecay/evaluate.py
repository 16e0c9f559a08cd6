"""Validation loss: the trainer's evaluation, and `python -m alphadecay.evaluate PATH` for any saved model.

The evaluation set is one tensor of rows, identical on every rank and independent of the world size and the
batch size (`data.build_eval_rows`). Rank r evaluates rows r, r+W, r+2W, … in micro-batches of --batch_size,
computes each row's summed next-token loss and target count, and one all-reduce puts every row's pair in the
global order on every rank. From those:
- `eval_loss`: the token mean over all rows (`eval_ppl` = exp);
- `eval_loss_official`: the official estimator (torchrun_main.py:158-180), computed as the official code would
  over global batches of --official_eval_rows consecutive rows: each batch's value is its token-mean loss (HF's
  mean cross-entropy over the batch), and the result is the sum of the batch values divided by (number of
  batches + 1), the official counter starting at 1. A final partial batch counts as a batch. The flag stands for
  the official run's world size × per-GPU batch, 512 in every official script; where the official run had two
  GPUs it averaged the two GPUs' batch means, which the token mean over their 512 rows matches to second order.
  The estimator is biased low by about 1/(batches + 1): about 1% in loss at the paper's 10M tokens.
So the same model gives the same values on any number of processes and at any --batch_size (the per-row losses
differ only by float rounding between batch shapes).

The CLI evaluates a checkpoint (`model_<step>`), a run directory (its latest checkpoint) or a `save_pretrained`
directory of a LLaMA model, including one trained elsewhere, on the validation split; under torchrun the ranks
share the rows. Data flags default to the run's own values when PATH belongs to one of our runs, else to the
training defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch
from transformers.utils import logging as hf_logging

from alphadecay import data, dist, pretokenized
from alphadecay.checkpoint import STATE_FILE, find_model_dir
from alphadecay.config import TrainConfig, add_config_flags
from alphadecay.errors import UserError
from alphadecay.esd.report import load_model
from alphadecay.loss import row_loss_sums
from alphadecay.model import cast_model, resolve_dtype
from alphadecay.parallel import is_sharded, reshard


def official_estimate(row_sums: torch.Tensor, row_counts: torch.Tensor, rows_per_batch: int) -> float:
    """Σ_k (token-mean loss of batch k) / (K + 1) over K batches of `rows_per_batch` consecutive rows (the last
    one possibly partial). A batch without targets counts as 0 (the official code would give NaN)."""
    batches = math.ceil(len(row_sums) / rows_per_batch)
    if batches == 0:
        return math.nan
    index = torch.arange(len(row_sums), device=row_sums.device) // rows_per_batch
    sums = torch.zeros(batches, dtype=torch.float64, device=row_sums.device).index_add_(0, index, row_sums.double())
    counts = torch.zeros_like(sums).index_add_(0, index, row_counts.double())
    return float((sums / counts.clamp(min=1)).sum() / (batches + 1))


@torch.no_grad()
def evaluate_rows(model: torch.nn.Module, rows: torch.Tensor, spec: data.RowSpec, *, info: dist.DistInfo,
                  batch_size: int, official_eval_rows: int, chunk_tokens: int = 0,
                  autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """eval_loss, eval_ppl, eval_loss_official, eval_ppl_official, eval_tokens of `model` (unwrapped, identical on
    every rank) on `rows`; a collective call: every rank passes the same rows. chunk_tokens > 0 computes the head
    and the loss that many tokens at a time (--loss_chunk_tokens, `alphadecay.loss.row_loss_sums`)."""
    device, total = info.device, rows.shape[0]
    per_row = torch.zeros(2, total, dtype=torch.float64, device=device)  # summed loss, targets
    was_training = model.training
    model.eval()
    chunks = torch.arange(info.rank, total, info.world_size).split(batch_size)
    sharded = is_sharded(model)
    # FSDP: every forward pass all-gathers weights with the other ranks, so every rank runs as many as rank 0
    # (a rank with fewer rows repeats its last micro-batch and discards the result)
    passes = math.ceil(math.ceil(total / info.world_size) / batch_size) if sharded else len(chunks)
    try:
        for i in range(passes):
            chunk = chunks[min(i, len(chunks) - 1)] if chunks else torch.zeros(1, dtype=torch.long)
            input_ids = rows[chunk].to(device).long()
            with autocast or contextlib.nullcontext():
                sums, counts = row_loss_sums(model, input_ids, data.labels_for(input_ids, spec),
                                             chunk_tokens=chunk_tokens)
            if i < len(chunks):
                per_row[:, chunk.to(device)] = torch.stack([sums, counts.double()])
    finally:
        model.train(was_training)
        if sharded:
            reshard(model)
    row_sums, row_counts = dist.all_reduce_sum(per_row)  # each row is non-zero on its one rank only: exact
    targets = float(row_counts.sum())
    eval_loss = float(row_sums.sum()) / max(targets, 1.0)
    official = official_estimate(row_sums, row_counts, official_eval_rows)
    return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
            "eval_loss_official": official, "eval_ppl_official": math.exp(min(official, 50.0)),
            "eval_tokens": int(targets)}


# ------------------------------------------------------------------------------------------------------------
# python -m alphadecay.evaluate PATH
# ------------------------------------------------------------------------------------------------------------
DATA_FLAGS = ("dataset", "dataset_config", "tokenizer", "max_length", "packing", "target_eval_tokens", "batch_size",
              "official_eval_rows", "dtype", "loss_chunk_tokens")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alphadecay.evaluate", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("path", help="checkpoint model_<step>, run directory, or save_pretrained directory")
    add_config_flags(parser, DATA_FLAGS, from_run=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = this rank's GPU when there is one, else CPU")
    parser.add_argument("--json", help="also write the results to this JSON file (rank 0)")
    return parser.parse_args(argv)


def run_settings(model_dir: str) -> dict:
    """The flags of the run a checkpoint belongs to (its run directory's config.json), or {}."""
    run_config = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.json")
    if not (os.path.isfile(os.path.join(model_dir, STATE_FILE)) and os.path.isfile(run_config)):
        return {}
    with open(run_config) as fh:
        saved = json.load(fh)
    return saved if isinstance(saved, dict) and "model_config" in saved else {}


def settings(args: argparse.Namespace, model_dir: str) -> dict:
    """Each data flag: the command line's value, else the run's, else the training default."""
    run, defaults = run_settings(model_dir), TrainConfig()
    out = {name: next(v for v in (getattr(args, name), run.get(name), getattr(defaults, name)) if v is not None)
           for name in DATA_FLAGS}
    for name in ("max_length", "target_eval_tokens", "batch_size", "official_eval_rows"):
        if out[name] <= 0:
            raise UserError(f"--{name} must be positive, got {out[name]}.")
    if out["loss_chunk_tokens"] < 0:
        raise UserError(f"--loss_chunk_tokens must be >= 0 (0 = the whole batch at once), got {out['loss_chunk_tokens']}.")
    return out


def evaluate_path(args: argparse.Namespace, info: dist.DistInfo) -> dict:
    model_dir = find_model_dir(args.path)
    flags = settings(args, model_dir)
    tokenizer = data.load_tokenizer(flags["tokenizer"], flags["max_length"])
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the official configs' pad_token_id -1 draws warnings on every load
    try:
        model = load_model(model_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    data.check_tokenizer_fits(tokenizer, model.config.vocab_size, flags["tokenizer"], model_dir)
    spec = data.RowSpec.from_tokenizer(tokenizer, flags["max_length"], flags["packing"])
    if pretokenized.is_pretokenized(flags["dataset"]):  # rows made by python -m alphadecay.pretokenize
        stored = pretokenized.open_dataset(flags["dataset"])
        stored.check_matches(tokenizer, flags["tokenizer"], spec)
        rows, exhausted = pretokenized.build_eval_rows(stored, spec, target_tokens=flags["target_eval_tokens"])
    else:
        files = data.list_shards(flags["dataset"], flags["dataset_config"], "validation")
        rows, exhausted = data.build_eval_rows(files, tokenizer, spec, target_tokens=flags["target_eval_tokens"])
    dtype, use_autocast, dtype_name = resolve_dtype(flags["dtype"], info.device)
    cast_model(model, info.device, dtype)
    autocast = torch.autocast(device_type=info.device.type, dtype=torch.bfloat16) if use_autocast else None
    result = evaluate_rows(model, rows, spec, info=info, batch_size=flags["batch_size"],
                           official_eval_rows=flags["official_eval_rows"], chunk_tokens=flags["loss_chunk_tokens"],
                           autocast=autocast)
    return {**result, "eval_rows": int(rows.shape[0]), "exhausted": exhausted, "model": model_dir,
            **{k: v for k, v in flags.items() if k != "dtype"}, "dtype_resolved": dtype_name,
            "world_size": info.world_size}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        info = dist.setup(args.device)
        try:
            result = evaluate_path(args, info)
        finally:
            dist.teardown()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info.is_main:
        for key in ("eval_loss", "eval_ppl", "eval_loss_official", "eval_ppl_official", "eval_tokens", "eval_rows"):
            print(f"{key} {result[key]}")
        if result["exhausted"]:
            print(f"note: the validation split has fewer than --target_eval_tokens {result['target_eval_tokens']:,} "
                  f"tokens; all of it was used")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
