"""Assemble a ViT run from its configuration: checks first (data layout, classes, every image's header, batch
sizes, the run directory, the checkpoint), then the model, EMA, parameter groups, optimizer, weight-decay
scheduler, data and logger. A bad input costs seconds, never a training run.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import PIL
import torch
from safetensors.torch import load_file

from alphadecay import dist
from alphadecay.checkpoint import (checkpoint_steps, disk_space_warning, estimate_checkpoint_bytes, load_checkpoint,
                                   remove_stale_temporaries, set_rng_state)
from alphadecay.device_init import built_on
from alphadecay.config import resolve_wd_timescale
from alphadecay.errors import UserError
from alphadecay.metrics import MetricsLogger
from alphadecay.optim import make_optimizer, resolve_optimizer_impl
from alphadecay.model import count_parameters
from alphadecay.run import locate_checkpoint, log0, start_logging, where_it_ran
from alphadecay.vit.config import ViTConfig
from alphadecay.vit.data import (EvalSamples, ImageFolder, TrainOrder, TrainSamples, find_unreadable,
                                 load_image_folders, unreadable_error)
from alphadecay.vit.ema import ModelEma
from alphadecay.vit.mixup import Mixup, build_criterion
from alphadecay.vit.model import build_vit, resolve_model_name
from alphadecay.vit.train import ViTState, ViTTrainer, run_layout
from alphadecay.vit.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_eval_transform,
                                       build_train_transform)
from alphadecay.wd.groups import module_param_groups
from alphadecay.wd.scheduler import from_flags, legacy_state

IMAGENET_INCEPTION_MEAN = IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's, for --imagenet_default_mean_and_std false


def number_of_classes(config: ViTConfig, train: ImageFolder) -> int:
    """--nb_classes, or the number of class folders; a head smaller than the folder count is an error."""
    if config.nb_classes is None:
        return train.num_classes
    if config.nb_classes < train.num_classes:
        raise UserError(f"--nb_classes {config.nb_classes}: --data_path {config.data_path} has {train.num_classes} "
                        f"class folders; give at least that many outputs, or omit the flag (one per folder).")
    return config.nb_classes


def check_images(train: ImageFolder, val: ImageFolder, data_path: str, info: dist.DistInfo) -> None:
    """Open every image's header, the ranks sharing the work; a UserError naming the unreadable ones.

    Why an error rather than skipping (alphadecay/vit/data.py): the paper's numbers are over every ImageNet image,
    and the training order is a permutation of the file list, so a skipped file would change both what is measured
    and which images every later update sees."""
    mine = [m for folder in (train, val)
            for m in find_unreadable(folder, range(info.rank, len(folder), info.world_size))]
    found = [m for ms in dist.all_gather_objects(mine) for m in ms]
    if found:
        raise unreadable_error(sorted(found), data_path)


def resolve_output_dir(config: ViTConfig, info: dist.DistInfo) -> tuple[str, str | None]:
    """(run directory, checkpoint to resume or None): --output_dir, else --resume's run directory, else
    checkpoints/<model>-<time>-<wandb_name>. A directory that already holds checkpoints is never overwritten."""
    checkpoint = locate_checkpoint(config.resume, "--resume", info) if config.resume else None
    if config.output_dir:
        run_dir = config.output_dir
    elif checkpoint:
        run_dir = os.path.dirname(os.path.abspath(checkpoint))
    else:
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
        run_dir = os.path.join("checkpoints", f"{config.model}-{stamp}-{config.wandb_name}")
    run_dir = dist.broadcast_object(run_dir)  # one name even when the ranks' clocks differ
    existing = [f"model_{s}" for s in checkpoint_steps(run_dir)]
    if config.auto_resume and existing:
        checkpoint = locate_checkpoint(run_dir, "--auto_resume", info)
    elif existing and not checkpoint:
        raise UserError(f"--output_dir {run_dir} already holds checkpoints ({', '.join(existing)}); resume with "
                        f"--resume {run_dir} (or --auto_resume true), or choose another --output_dir.")
    if info.is_main:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"--output_dir {run_dir} cannot be created ({err.strerror}); give a writable directory "
                            "(the official scripts' /home/hedi/... paths are the authors' own).") from None
        for note in remove_stale_temporaries(run_dir):
            print(f"note: {note}", flush=True)
    dist.barrier()
    return run_dir, checkpoint


def restore(checkpoint: str, saved: dict, layout: dict, *, optimizer, wd_scheduler, ema: ModelEma | None,
            info: dist.DistInfo) -> ViTState:
    """Put the optimizer (with its per-group decays and lr), the weight-decay scheduler, the EMA and this rank's RNG
    states back where they were; the data position follows from the update count."""
    if saved["layout"] != layout:
        raise UserError(f"--resume {checkpoint}: it was written with {saved['layout']}, this run has {layout}; the "
                        "data order, augmentation and random streams resume exactly only under the same values, so "
                        "resume with the same number of processes, --batch_size, --update_freq, --seed and data.")
    optimizer.load_state_dict(saved["optimizer"])
    wd_scheduler.load_state_dict(legacy_state(saved["wd_scheduler"], saved["step"]))
    if ema is not None:
        load_ema(ema, checkpoint)
    set_rng_state(saved["rng"][info.rank])
    return ViTState(step=saved["step"], train_time=saved["train_time"], best=dict(saved["best"]))


def load_ema(ema: ModelEma, checkpoint: str) -> None:
    path = os.path.join(checkpoint, "model_ema.safetensors")
    if not os.path.exists(path):
        raise UserError(f"--resume {checkpoint} has no EMA weights (it was trained without --model_ema); resume it "
                        "without --model_ema.")
    ema.load_state_dict(load_file(path, device=str(next(ema.module.parameters()).device)))


def build_vit_trainer(config: ViTConfig, info: dist.DistInfo) -> ViTTrainer:
    # -- checks: everything a user can get wrong, before any compute --------------------------------------------
    train, val = load_image_folders(config.data_path)
    num_classes = number_of_classes(config, train)
    order = TrainOrder(len(train), batch_size=config.batch_size, world_size=info.world_size, seed=config.seed)
    updates_per_epoch = order.steps_per_epoch // config.update_freq
    if updates_per_epoch == 0:
        raise UserError(f"--update_freq {config.update_freq}: each process has {order.steps_per_epoch} micro-batches "
                        f"of --batch_size {config.batch_size} per epoch, fewer than one update needs; lower one of "
                        "them.")
    timescale_note = resolve_wd_timescale(config, config.epochs * updates_per_epoch)  # --wd_timescale's decay
    mean, std = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if config.imagenet_default_mean_and_std
                 else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
    train_transform = build_train_transform(
        config.input_size, aa=config.aa, train_interpolation=config.train_interpolation, reprob=config.reprob,
        remode=config.remode, recount=config.recount, color_jitter=config.color_jitter, mean=mean, std=std)
    eval_transform = build_eval_transform(config.input_size, crop_pct=config.crop_pct, mean=mean, std=std)
    mixup = (Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, cutmix_minmax=config.cutmix_minmax,
                   prob=config.mixup_prob, switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                   label_smoothing=config.smoothing, num_classes=num_classes) if config.mixup_active else None)
    if config.check_images:
        start = time.perf_counter()
        check_images(train, val, config.data_path, info)
        log0(info, f"checked {len(train) + len(val):,} image headers in {time.perf_counter() - start:.1f} s")
    if config.eval:  # evaluate only: read --resume's checkpoint, write nothing anywhere
        run_dir, checkpoint = "", locate_checkpoint(config.resume, "--resume", info) if config.resume else None
    else:
        run_dir, checkpoint = resolve_output_dir(config, info)
    weights, saved = load_checkpoint(checkpoint, info.device) if checkpoint else (None, None)

    # -- model, EMA, groups, optimizer, scheduler ------------------------------------------------------------------
    torch.manual_seed(config.seed + info.rank)  # as the official main.py; DDP then gives every rank rank 0's init
    with built_on(info.device):  # the CPU build's values, without the whole model on the host
        raw_model = build_vit(config.model, num_classes=num_classes, img_size=config.input_size,
                              drop_path_rate=config.drop_path)
    if weights is not None:
        raw_model.load_state_dict(weights, strict=True)
        del weights
    raw_model.to(info.device)
    model: torch.nn.Module = raw_model
    if info.distributed:  # broadcasts rank 0's weights before the EMA copies them
        model = dist.ddp(raw_model, info)
    ema = ModelEma(raw_model, decay=config.model_ema_decay) if config.model_ema else None
    param_groups = module_param_groups(raw_model, config.weight_decay, decay_norms=config.decay_norms,
                                       decay_embeddings=config.decay_embeddings)
    optimizer = make_optimizer(param_groups, name=config.optimizer, lr=config.lr,
                               betas=tuple(config.opt_betas) if config.opt_betas else (0.9, 0.999),
                               eps=config.opt_eps, impl=config.optimizer_impl, device=info.device)
    optimizer_impl = resolve_optimizer_impl(config.optimizer_impl, config.optimizer, info.device)
    # the official ViT code's timing: a pass at the first update of every epoch, on that update's gradients
    wd_scheduler = from_flags(config, raw_model, optimizer, timing="vit", updates_per_epoch=updates_per_epoch)
    if not config.eval and config.save_ckpt:
        size = estimate_checkpoint_bytes(raw_model, optimizer, (ema.module,) if ema is not None else ())
        if warning := dist.on_main(disk_space_warning, run_dir, size):
            log0(info, warning)

    trainer_layout = run_layout(config, info.world_size, len(train))
    if saved and config.eval:
        state = ViTState(step=saved["step"])
        if ema is not None:
            load_ema(ema, checkpoint)
    elif saved:
        state = restore(checkpoint, saved, trainer_layout, optimizer=optimizer, wd_scheduler=wd_scheduler, ema=ema,
                        info=info)
        log0(info, f"resuming {checkpoint} at update {state.step} (epoch {state.step / updates_per_epoch:g})")
    else:
        state = ViTState()

    # -- data, loss, logging ---------------------------------------------------------------------------------------
    dtype_name = config.resolved_dtype
    autocast = (torch.autocast(device_type=info.device.type, dtype=torch.bfloat16) if dtype_name == "amp_bf16"
                else contextlib.nullcontext())
    warmup_updates = config.warmup_steps if config.warmup_steps > 0 else config.warmup_epochs * updates_per_epoch
    run_provenance = {
        "world_size": info.world_size, "micro_batch": config.batch_size, "gradient_accumulation": config.update_freq,
        "dtype_resolved": dtype_name, "optimizer_impl_resolved": optimizer_impl, "num_classes": num_classes,
        "train_images": len(train), "val_images": len(val), "updates_per_epoch": updates_per_epoch,
        "torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__, **where_it_ran(info)}
    if config.eval:
        logger = MetricsLogger(run_dir, enabled=False, project=config.project, name=config.wandb_name, mode="disabled",
                               config={})
    else:
        logger = start_logging(config, info, run_dir, raw_model, optimizer, run_provenance, state.step, saved,
                               project=config.project, mode=config.wandb_mode if config.enable_wandb else "disabled",
                               extra={"model_resolved": resolve_model_name(config.model)})
        if config.use_modulewise_wd:
            log0(info, "note: the module-wise pass runs at the first update of every epoch, as in the official ViT "
                       "code (--unbalancedWD_every is ignored for the ViT)")
    log0(info, f"model {config.model}: {count_parameters(raw_model) / 1e6:.2f}M parameters, {num_classes} classes, "
               f"{config.input_size} px, {dtype_name} on {info.device} x {info.world_size}; optimizer "
               f"{config.optimizer} ({optimizer_impl} kernel); weight decay: {config.wd_method()}; {config.epochs} epochs x "
               f"{updates_per_epoch} updates of {config.batch_size} x {config.update_freq} x {info.world_size} images "
               f"({len(train):,} train, {len(val):,} val); lr {config.lr:g}, warmup {warmup_updates} updates, final "
               f"lr {config.lr * config.min_lr_ratio():.3g}; run directory {run_dir}")
    if timescale_note:
        log0(info, timescale_note)
    trainer = ViTTrainer(config=config, info=info, model=model, raw_model=raw_model, ema=ema, optimizer=optimizer,
                         wd_scheduler=wd_scheduler, criterion=build_criterion(mixup_active=mixup is not None,
                                                                              smoothing=config.smoothing),
                         mixup=mixup, train_samples=TrainSamples(train, train_transform, seed=config.seed),
                         val_samples=EvalSamples(val, eval_transform), order=order, logger=logger, run_dir=run_dir,
                         updates_per_epoch=updates_per_epoch, warmup_updates=warmup_updates, autocast=autocast,
                         state=state)
    if saved and not config.eval:
        trainer.nonfinite.load_state_dict(saved.get("nonfinite", {}))
    return trainer

