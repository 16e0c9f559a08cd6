"""Assemble a run from its configuration: checks first, then model, data, optimizer, scheduler, logger.

Everything a user can get wrong (files, sizes, tokenizer, data layout, hub access) is checked before the model is
built, so a bad input costs seconds, not a training run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import torch
import transformers
from transformers.utils import logging as hf_logging

from alphadecay import config as config_lib
from alphadecay import data, dist, parallel, pretokenized, sharded_checkpoint
from alphadecay.checkpoint import (disk_space_warning, estimate_checkpoint_bytes, find_checkpoint, load_checkpoint,
                                   load_training_state, remove_stale_temporaries, set_rng_state)
from alphadecay.config import TrainConfig
from alphadecay.diagnostics import ScalingDiagnostics
from alphadecay.errors import UserError
from alphadecay.loss import CausalLMLoss, target_count
from alphadecay.metrics import MetricsLogger
from alphadecay.model import build_model, cast_model, count_parameters, load_model_config, resolve_dtype
from alphadecay.optim import build_optimizer, resolve_optimizer_impl
from alphadecay.wd.groups import describe, module_param_groups
from alphadecay.wd.scheduler import from_flags, legacy_state
from alphadecay.scaling import apply_scaling_rule
from alphadecay.trainer import Trainer, TrainState


def log0(info: dist.DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def gradient_accumulation(config: TrainConfig, world_size: int) -> int:
    per_update = config.batch_size * world_size
    if config.total_batch_size % per_update:
        raise UserError(f"--total_batch_size {config.total_batch_size} is not a multiple of --batch_size "
                        f"{config.batch_size} x {world_size} process(es) = {per_update}; use a multiple of {per_update} "
                        f"(e.g. {per_update * max(1, round(config.total_batch_size / per_update))}) or change --batch_size.")
    accumulation = config.total_batch_size // per_update
    if config.gradient_accumulation is not None and config.gradient_accumulation != accumulation:
        raise UserError(f"--gradient_accumulation {config.gradient_accumulation} contradicts --total_batch_size "
                        f"{config.total_batch_size} / (--batch_size {config.batch_size} x {world_size} processes) "
                        f"= {accumulation}; omit it or make them agree.")
    return accumulation


def locate_checkpoint(path: str, flag: str, info: dist.DistInfo) -> str:
    """The checkpoint `path` names (it must verify) or its run directory's newest that verifies (LLaMA's
    --continue_from, the ViT's --resume): rank 0 checks, reading every byte once, every rank gets the answer, and
    rank 0 prints what was skipped."""
    found = dist.on_main(find_checkpoint, path, flag)
    for note in found.notes:
        log0(info, note)
    return found.path


def resolve_compile(config: TrainConfig, device: torch.device) -> bool:
    """--compile: auto = on CUDA, off on CPU. Checks that the compiler backend has what it needs (a C++ compiler on
    CPU, triton on CUDA), so a missing one is a clear error now rather than a traceback at the first update."""
    if config.compile == "false" or (config.compile == "auto" and device.type != "cuda"):
        return False
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile needs triton on CUDA (it ships with the CUDA builds of torch); install it or add "
                        "--compile false.")
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise UserError(f"--compile true on CPU needs a C++ compiler ({compiler}, or $CXX); install one or add "
                            "--compile false.")
    return True


def wrap_model(raw_model: torch.nn.Module, config: TrainConfig, info: dist.DistInfo, *,
               compile: bool) -> torch.nn.Module:
    """The module the trainer runs: CausalLMLoss(raw_model) (--loss_chunk_tokens), torch.compile'd (--compile), then
    DDP over several processes.

    DDP wraps the model together with its loss, so its gradient hooks cover the head when the loss computes the
    head's gradient itself (chunked). DDP wraps the compiled module (as nanoGPT does): DDP's forward marks itself
    active, and dynamo then splits the compiled graph at DDP's bucket boundaries (DDPOptimizer), so gradient
    all-reduces still overlap the backward pass. Checkpoints, evaluation and the spectral passes use the raw model,
    so checkpoint keys never carry a compiled module's `_orig_mod.` prefix and a run resumes with or without
    --compile whichever way it was saved."""
    model: torch.nn.Module = CausalLMLoss(raw_model, config.loss_chunk_tokens)
    if compile:
        model = torch.compile(model)
    return dist.ddp(model, info) if info.distributed else model


def resolve_run_dir(config: TrainConfig, info: dist.DistInfo, checkpoint: str | None) -> str:
    """--save_dir, else the resumed checkpoint's run directory, else checkpoints/<config>-<time>-<wandb_name>."""
    if config.save_dir:
        run_dir = config.save_dir
    elif checkpoint:
        run_dir = os.path.dirname(os.path.abspath(checkpoint))
    else:
        stem = os.path.splitext(os.path.basename(config.model_config))[0]
        run_dir = os.path.join("checkpoints", f"{stem}-{time.strftime('%Y-%m-%d-%H-%M-%S')}-{config.wandb_name}")
    run_dir = dist.broadcast_object(run_dir)  # one name even when the ranks' clocks differ
    if not config.continue_from and os.path.isdir(run_dir):
        existing = sorted(d for d in os.listdir(run_dir) if d.startswith("model_"))
        if existing:
            raise UserError(f"--save_dir {run_dir} already holds checkpoints ({', '.join(existing)}); resume with "
                            f"--continue_from {run_dir}, or choose another --save_dir.")
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        for note in remove_stale_temporaries(run_dir):
            print(f"note: {note}", flush=True)
    dist.barrier()
    return run_dir


def provenance(config: TrainConfig, info: dist.DistInfo, *, grad_accum: int, dtype_name: str, optimizer_impl: str,
               eval_rows: torch.Tensor, spec: data.RowSpec, reduce_dtype: torch.dtype | None = None) -> dict:
    """What changes a run's numbers without being a flag (config.PROVENANCE_KEYS, which scripts/make_tables.py
    compares across the runs of a table cell), the dtype gradients are reduced in (--reduce_dtype resolved; DDP:
    the parameters'), then where it ran."""
    reduced = str(reduce_dtype).removeprefix("torch.") if reduce_dtype is not None else None
    return {"world_size": info.world_size, "micro_batch": config.batch_size, "gradient_accumulation": grad_accum,
            "dtype_resolved": dtype_name, "optimizer_impl_resolved": optimizer_impl, "reduce_dtype_resolved": reduced,
            "official_eval_rows": config.official_eval_rows, "eval_rows": int(eval_rows.shape[0]),
            "eval_tokens": target_count(data.labels_for(eval_rows, spec)), "torch": torch.__version__,
            "transformers": transformers.__version__, **where_it_ran(info)}


def where_it_ran(info: dist.DistInfo) -> dict:
    """The code (git commit, uncommitted changes) and the machine (CUDA, device, GPU) of a run's provenance."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "cuda": torch.version.cuda, "device": str(info.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


@dataclass
class Inputs:
    """What the checks produce: everything needed before the model exists."""

    model_config: object
    tokenizer: object
    spec: data.RowSpec
    train_files: list[str]
    eval_files: list[str]
    grad_accum: int
    checkpoint: str | None  # the checkpoint directory --continue_from resolves to
    pretokenized: pretokenized.Pretokenized | None = None  # --dataset made by `python -m alphadecay.pretokenize`


def check_inputs(config: TrainConfig, info: dist.DistInfo) -> Inputs:
    """Every user-fixable problem, before any compute."""
    model_config = load_model_config(config.model_config)
    grad_accum = gradient_accumulation(config, info.world_size)
    tokenizer = data.load_tokenizer(config.tokenizer, config.max_length)
    data.check_tokenizer_fits(tokenizer, model_config.vocab_size, config.tokenizer, config.model_config)
    spec = data.RowSpec.from_tokenizer(tokenizer, config.max_length, config.packing)
    if pretokenized.is_pretokenized(config.dataset):  # rows made ahead of training: check they match the flags
        stored = pretokenized.open_dataset(config.dataset)
        stored.check_matches(tokenizer, config.tokenizer, spec)
        train_files, eval_files = [], []
    else:  # streaming
        stored = None
        train_files = data.list_shards(config.dataset, config.dataset_config, "train")
        eval_files = data.list_shards(config.dataset, config.dataset_config, "validation")
    checkpoint = locate_checkpoint(config.continue_from, "--continue_from", info) if config.continue_from else None
    return Inputs(model_config, tokenizer, spec, train_files, eval_files, grad_accum, checkpoint, stored)


def restore(saved: dict, optimizer, wd_scheduler, train_batches, info: dist.DistInfo, *,
            model: torch.nn.Module | None = None, checkpoint: str | None = None) -> TrainState:
    """Put the optimizer, the weight-decay scheduler, this rank's data position and RNG back where they were;
    for a checkpoint of an FSDP run (`checkpoint`, its DCP shards), the raw `model`'s weights too, resharded to
    this run's layout (alphadecay/sharded_checkpoint.py).

    Streaming data is split into per-rank streams, so it resumes only on the same number of processes. Pretokenized
    data has one position for all ranks (updates, epoch, row: the next global batch), so it resumes on any number.
    Rank r then restores the global RNG states of saved rank r mod (saved world size): nothing in training draws
    from them today (no dropout; data order has its own seeded generators), and this keeps any future consumer
    deterministic for a given checkpoint and world size.
    """
    portable = getattr(train_batches, "world_size_independent", False)
    saved_pretokenized = saved["data"][0].get("kind") == "pretokenized"
    if saved_pretokenized != portable:
        kinds = ("streamed", "pretokenized")
        raise UserError(f"--continue_from: the checkpoint was trained on {kinds[saved_pretokenized]} data, but this "
                        f"run's --dataset is {kinds[portable]}; resume with the --dataset it was trained on.")
    if saved["world_size"] != info.world_size and not portable:
        raise UserError(f"--continue_from: the checkpoint was written by {saved['world_size']} process(es); "
                        f"resume it with the same number (this run has {info.world_size}), or train from "
                        f"pretokenized data (python -m alphadecay.pretokenize), which resumes on any number.")
    if saved.get("format") == sharded_checkpoint.FORMAT:
        sharded_checkpoint.load(checkpoint, model, optimizer)
    else:  # a DDP checkpoint: the weights were loaded before the model was built; an FSDP run shards the state
        sharded_checkpoint.load_optimizer_state(model, optimizer, saved["optimizer"])
    wd_scheduler.load_state_dict(legacy_state(saved["wd_scheduler"], saved["step"]))
    train_batches.load_state_dict(saved["data"][0 if portable else info.rank])
    set_rng_state(saved["rng"][info.rank % len(saved["rng"])])
    return TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"], train_time=saved["train_time"])


def build_trainer(config: TrainConfig, info: dist.DistInfo) -> Trainer:
    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar would interleave with ours
    inputs = check_inputs(config, info)
    run_dir = resolve_run_dir(config, info, inputs.checkpoint)
    dtype, use_autocast, dtype_name = resolve_dtype(config.dtype, info.device)
    use_compile = resolve_compile(config, info.device)
    total_steps = config.train_steps()
    timescale_note = config_lib.resolve_wd_timescale(config, total_steps)  # --wd_timescale's decay (parse_args set it)

    if inputs.checkpoint and sharded_checkpoint.is_sharded_checkpoint(inputs.checkpoint):  # an FSDP run's
        weights, saved = None, load_training_state(inputs.checkpoint)  # weights: in restore()
    else:
        weights, saved = load_checkpoint(inputs.checkpoint, info.device) if inputs.checkpoint else (None, None)
    raw_model = build_model(inputs.model_config, seed=config.seed, device=info.device)
    if weights is not None:
        raw_model.load_state_dict(weights, strict=True)
        del weights
    cast_model(raw_model, info.device, dtype)
    if config.activation_checkpointing:
        raw_model.gradient_checkpointing_enable()
    reduce_dtype = parallel.reduce_dtype(config.reduce_dtype, dtype)
    sharded_model = None  # --parallelism fsdp: the raw model is sharded in place, before the optimizer sees it
    if config.parallelism == "fsdp":
        sharded_model = parallel.fully_shard_llama(raw_model, info.device, chunk_tokens=config.loss_chunk_tokens,
                                                   reduce_dtype=reduce_dtype, compile=use_compile)
    param_groups = module_param_groups(raw_model, config.weight_decay, decay_norms=config.decay_norms,
                                       decay_embeddings=config.decay_embeddings)
    apply_scaling_rule(param_groups, rule=config.scaling_rule, width=inputs.model_config.hidden_size,
                       base_width=config.base_width, head=config.scaling_head)
    optimizer = build_optimizer(param_groups, config, info.device)
    optimizer_impl = resolve_optimizer_impl(config.optimizer_impl, config.optimizer, info.device)
    wd_scheduler = from_flags(config, raw_model, optimizer)
    if warning := dist.on_main(disk_space_warning, run_dir, estimate_checkpoint_bytes(raw_model, optimizer)):
        log0(info, warning)

    if inputs.pretokenized is not None:  # one global permutation; each rank takes its share of every batch
        train_batches = inputs.pretokenized.train_batches(
            inputs.spec, seed=config.data_seed, total_batch_size=config.total_batch_size,
            batch_size=config.batch_size, rank=info.rank, world_size=info.world_size)
    else:  # streaming: each rank reads its own shards
        documents = data.DocumentStream(inputs.train_files, rank=info.rank, world_size=info.world_size,
                                        seed=config.data_seed, buffer_size=config.shuffle_buffer,
                                        retry_seconds=config.hub_retry_seconds)
        train_batches = data.TokenBatches(documents, inputs.tokenizer, inputs.spec, config.batch_size)
    state = (restore(saved, optimizer, wd_scheduler, train_batches, info, model=raw_model,
                     checkpoint=inputs.checkpoint) if saved else TrainState())
    if saved:
        log0(info, f"resuming from update {state.step} of {total_steps}")

    if inputs.pretokenized is not None:
        eval_rows, exhausted = pretokenized.build_eval_rows(inputs.pretokenized, inputs.spec,
                                                            target_tokens=config.target_eval_tokens)
    else:
        eval_rows, exhausted = data.build_eval_rows(inputs.eval_files, inputs.tokenizer, inputs.spec,
                                                    target_tokens=config.target_eval_tokens,
                                                    retry_seconds=config.hub_retry_seconds)
    if not len(eval_rows):
        raise UserError(f"--dataset {config.dataset}: the validation split holds no complete row to evaluate on.")
    if exhausted:
        log0(info, f"note: the validation split has fewer than --target_eval_tokens {config.target_eval_tokens:,} "
                   f"tokens; every evaluation uses all of it")
    probes = ([ScalingDiagnostics.from_eval_rows(config.diagnostics_every, eval_rows, inputs.spec, info.device)]
              if config.diagnostics_every else [])
    model = sharded_model if sharded_model is not None else wrap_model(raw_model, config, info, compile=use_compile)
    run_provenance = provenance(config, info, grad_accum=inputs.grad_accum, dtype_name=dtype_name,
                                optimizer_impl=optimizer_impl, eval_rows=eval_rows, spec=inputs.spec,
                                reduce_dtype=reduce_dtype)
    logger = start_logging(config, info, run_dir, raw_model, optimizer, run_provenance, state.step, saved,
                           project=config.wandb_project, mode=config.wandb_mode,
                           tags=config.tags.split(",") if config.tags else None, extra={"updates": total_steps})
    autocast = (torch.autocast(device_type=info.device.type, dtype=torch.bfloat16) if use_autocast
                else contextlib.nullcontext())
    speed = ((", FSDP" if sharded_model is not None else "") + (", compiled" if use_compile else "")
             + (f", loss over {config.loss_chunk_tokens}-token chunks" if config.loss_chunk_tokens else ""))
    log0(info, f"model {count_parameters(raw_model) / 1e6:.2f}M parameters, {dtype}"
               f"{' + bf16 autocast' if use_autocast else ''}{speed} on {info.device} x {info.world_size}; optimizer "
               f"{config.optimizer} ({optimizer_impl} kernel, --optimizer_impl {config.optimizer_impl}); weight decay: "
               f"{config.wd_method()}; {total_steps} updates of {config.total_batch_size} x {config.max_length} tokens "
               f"(accumulation {inputs.grad_accum}); evaluation on {len(eval_rows):,} rows "
               f"({run_provenance['eval_tokens']:,} tokens), official estimator over batches of "
               f"{config.official_eval_rows} rows; run directory {run_dir}")
    if timescale_note:
        log0(info, timescale_note)
    trainer = Trainer(config=config, info=info, model=model, raw_model=raw_model, optimizer=optimizer,
                      wd_scheduler=wd_scheduler, train_batches=train_batches, eval_rows=eval_rows,
                      row_spec=inputs.spec, logger=logger, run_dir=run_dir, total_steps=total_steps,
                      grad_accum=inputs.grad_accum, autocast=autocast, state=state, probes=probes)
    if saved:
        trainer.nonfinite.load_state_dict(saved.get("nonfinite", {}))
    return trainer


def start_logging(config: config_lib.FlagConfig, info: dist.DistInfo, run_dir: str, model, optimizer,
                  run_provenance: dict, step: int, saved: dict | None, *, project: str, mode: str | None,
                  tags: list[str] | None = None, extra: dict | None = None) -> MetricsLogger:
    """Save the config with the run's provenance, start metrics.jsonl and wandb (rank 0; both get the provenance:
    metrics.jsonl as a `provenance` event at every start, so a resumed run keeps each segment's), and print the
    run's description. For every model family (the ViT's run.py too); `extra` goes to wandb's config."""
    run_info = {**config.to_dict(), **run_provenance, "total_params_M": count_parameters(model) / 1e6,
                "wd_method": config.wd_method(), **(extra or {})}
    if info.is_main:
        config_lib.save(config, os.path.join(run_dir, "config.json"), provenance=run_provenance)
    logger = MetricsLogger(run_dir, enabled=info.is_main, project=project, name=config.wandb_name, mode=mode,
                           config=run_info, resume_step=step, wandb_id=saved.get("wandb_id") if saved else None,
                           tags=tags)
    logger.record({"provenance": run_provenance}, step=step)
    log0(info, f"{config.table()}\n\n{describe(optimizer.param_groups)}\n")
    if config.use_modulewise_wd and not config.alpha_positively_with_WD:
        log0(info, "note: --use_modulewise_wd without --alpha_positively_with_WD measures and logs the module-wise "
                   "metrics but keeps every decay at its base value (add --alpha_positively_with_WD to apply them)")
    return logger
