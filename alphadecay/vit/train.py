"""The ViT training loop: epochs of optimizer updates, then an evaluation and a checkpoint after each epoch.

One update (`ViTTrainer.update`), as the official ViT engine.py does it:
  1. `--update_freq` micro-batches of `--batch_size` images on each of W processes; each is augmented per image
     (keyed by (seed, epoch, image)), then Mixup/CutMix'ed per micro-batch (keyed by (seed, epoch, micro-batch,
     rank)) on the device;
  2. forward/backward each micro-batch with loss = its batch mean / update_freq, `no_sync` on all but the last
     (DDP averages the ranks): every micro-batch has the same size, so the gradient is that of the mean loss over
     the global batch of batch_size x update_freq x W images;
  3. optional clipping (`--clip_grad`), the weight-decay scheduler (the module-wise pass at the first update of
     each epoch, on these gradients), `optimizer.step()`, then the EMA update.
The learning rate is set per update: linear warmup from 0 over --warmup_epochs, then cosine down to
lr x `config.min_lr_ratio()` at the last update (optim.lr_factor, the official formula).

After the last update of an epoch: the evaluation (top-1/top-5 and loss of the model and, with --model_ema_eval,
of the EMA, each image counted once over all ranks), then a checkpoint. SIGTERM/SIGINT stop the run after the
current update with a checkpoint (trainer.StopFlag). A resumed run continues at the next update of its epoch with
the same data, augmentation, RNG, optimizer, EMA and weight-decay state, so it gives the same numbers as a run
that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alphadecay import dist
from alphadecay.checkpoint import prune_checkpoints, rng_state, save_checkpoint
from alphadecay.optim import lr_factor, set_learning_rate
from alphadecay.wd.groups import mean_weight_decay
from alphadecay.trainer import StopFlag
from alphadecay.update import NonfiniteGuard, Outcome, finish_update, gradient_norm
from alphadecay.vit.config import ViTConfig
from alphadecay.vit.data import EvalSamples, TrainOrder, TrainSamples, eval_indices, load_batches, topk_correct
from alphadecay.vit.ema import ModelEma
from alphadecay.vit.mixup import Mixup
from alphadecay.vit.transforms import batch_rng


@dataclass
class ViTState:
    step: int = 0  # updates completed
    train_time: float = 0.0  # seconds spent in updates (not evaluation or checkpointing)
    best: dict[str, float] = field(default_factory=dict)  # the best top1 (and ema_top1) so far


class ViTTrainer:
    def __init__(self, *, config: ViTConfig, info: dist.DistInfo, model: torch.nn.Module, raw_model: torch.nn.Module,
                 ema: ModelEma | None, optimizer: torch.optim.Optimizer, wd_scheduler, criterion: torch.nn.Module,
                 mixup: Mixup | None, train_samples: TrainSamples, val_samples: EvalSamples, order: TrainOrder,
                 logger, run_dir: str, updates_per_epoch: int, warmup_updates: int,
                 autocast: contextlib.AbstractContextManager, state: ViTState):
        self.config, self.info, self.model, self.raw_model, self.ema = config, info, model, raw_model, ema
        self.optimizer, self.wd_scheduler, self.criterion, self.mixup = optimizer, wd_scheduler, criterion, mixup
        self.train_samples, self.val_samples, self.order = train_samples, val_samples, order
        self.logger, self.run_dir, self.autocast, self.state = logger, run_dir, autocast, state
        self.updates_per_epoch, self.warmup_updates = updates_per_epoch, warmup_updates
        self.total_updates = config.epochs * updates_per_epoch
        self.global_batch = config.batch_size * config.update_freq * info.world_size
        self.stop = StopFlag()
        self.nonfinite = NonfiniteGuard(config.nonfinite, config.max_skipped_updates)

    @classmethod
    def for_updates(cls, config: ViTConfig, info: dist.DistInfo, model: torch.nn.Module, raw_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, wd_scheduler, criterion: torch.nn.Module) -> ViTTrainer:
        """A trainer that only runs `update` on micro-batches it is given: no data, evaluation, logging or saving
        (for tests and benchmarks). `model` is what the update runs (raw_model, or DDP around it)."""
        return cls(config=config, info=info, model=model, raw_model=raw_model, ema=None, optimizer=optimizer,
                   wd_scheduler=wd_scheduler, criterion=criterion, mixup=None, train_samples=None, val_samples=None,
                   order=None, logger=None, run_dir="", updates_per_epoch=1, warmup_updates=0,
                   autocast=contextlib.nullcontext(), state=ViTState())

    def lr_at(self, step: int) -> float:
        return self.config.lr * lr_factor(step, total_steps=self.total_updates, warmup_steps=self.warmup_updates,
                                          schedule="cosine", min_lr_ratio=self.config.min_lr_ratio())

    # -- one update ------------------------------------------------------------------------------------------
    def micro_batches(self, epoch: int, first_update: int):
        """This rank's (images, targets) micro-batches of `epoch`, from update `first_update` on, on the device and
        mixed; the i-th micro-batch of the epoch has its own Mixup generator, whatever the update it starts."""
        config, rank = self.config, self.info.rank
        keys = ([(epoch, int(i)) for i in batch]
                for batch in self.order.batches(epoch, rank, first_update * config.update_freq))
        batches = load_batches(self.train_samples, keys, num_workers=config.num_workers, pin_memory=config.pin_mem)
        for micro, (images, targets) in enumerate(batches, start=first_update * config.update_freq):
            images = images.to(self.info.device, non_blocking=True)
            targets = targets.to(self.info.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets, batch_rng(config.seed, epoch, micro, rank))
            yield images, targets

    def update(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Outcome:
        """One optimizer update (alphadecay/update.py: one host read, after the step is queued, or before it with
        --nonfinite skip); the Outcome's loss_sum is the sum of micro-batch mean losses over all ranks."""
        device = self.info.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.model.train()
        for i, (images, targets) in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1 or not self.info.distributed
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast:
                loss = self.criterion(self.model(images), targets)
            (loss / len(micro_batches)).backward()
            loss_sum += loss.detach().double()
        grad_norm = gradient_norm(self.raw_model.parameters(), self.config.clip_grad or 0.0)
        outcome = Outcome.start(torch.zeros(0, dtype=torch.float64, device=device), loss_sum, grad_norm,
                                self.stop.raised, self.info)
        return finish_update(outcome, nonfinite=self.config.nonfinite, wd_scheduler=self.wd_scheduler,
                             optimizer=self.optimizer,
                             after_step=(lambda: self.ema.update(self.raw_model)) if self.ema is not None else None)

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> ViTState:
        config, upe = self.config, self.updates_per_epoch
        self.stop.install()
        bar = tqdm(total=self.total_updates, initial=self.state.step, disable=not self.info.is_main,
                   dynamic_ncols=True, desc="train", mininterval=0.1 if sys.stderr.isatty() else 30.0)
        window = self._empty_window()
        try:
            while self.state.step < self.total_updates:
                epoch, first = divmod(self.state.step, upe)
                batches = self.micro_batches(epoch, first)
                stop = False
                for step in range(epoch * upe + first, (epoch + 1) * upe):
                    lr = self.lr_at(step)
                    set_learning_rate(self.optimizer, lr)
                    start = time.perf_counter()  # the previous update's read (or an evaluation) left the GPU idle
                    outcome = self.update([next(batches) for _ in range(config.update_freq)])
                    elapsed = time.perf_counter() - start  # up to the read: the GPU's work is done
                    self.state.step, self.state.train_time = step + 1, self.state.train_time + elapsed
                    self.nonfinite.check(outcome, self.state.step, logger=self.logger,
                                         run_dir=self.run_dir)
                    stop = outcome.stop  # every rank stops after the same update
                    if outcome.applied:
                        window["loss"] += outcome.loss_sum
                        window["applied"] += 1
                    window["updates"] += 1
                    window["time"] += elapsed
                    window["grad_norm"] = outcome.grad_norm
                    if self.state.step % config.log_every == 0 or self.state.step % upe == 0:
                        self._log_train(window, lr, {**window["wd"], **outcome.wd_metrics}, bar)
                        window = self._empty_window()
                    elif self.wd_scheduler.passed:  # a module-wise pass: a record at its own update
                        self.logger.log(outcome.wd_metrics, step=self.state.step)
                    else:  # metrics of every update (AWD's, a form's): the latest go into the next log line
                        window["wd"].update(outcome.wd_metrics)
                    bar.update(1)
                    if stop:
                        break
                saved = False
                if self.state.step % upe == 0:  # the epoch is complete
                    if not config.disable_eval:
                        self.evaluate_and_log()
                    done = self.state.step == self.total_updates
                    if config.save_ckpt and ((epoch + 1) % config.save_ckpt_freq == 0 or done):
                        self.save()
                        saved = True
                if stop:
                    if not saved:
                        self.save()
                    bar.write(f"stopped by signal after update {self.state.step}; checkpoint saved in {self.run_dir}")
                    break
        finally:
            bar.close()
            self.stop.uninstall()
        return self.state

    @staticmethod
    def _empty_window() -> dict:
        """Sums over the updates since the last training log line (host values: no synchronisation to log)."""
        return {"loss": 0.0, "updates": 0, "applied": 0, "time": 0.0, "grad_norm": math.nan, "wd": {}}

    def _log_train(self, window: dict, lr: float, wd_metrics: dict, bar) -> None:
        micro_batches = window["applied"] * self.config.update_freq * self.info.world_size
        loss = window["loss"] / micro_batches if micro_batches else math.nan
        metrics = {"loss": loss, "lr": lr, "weight_decay": mean_weight_decay(self.optimizer.param_groups),
                   "grad_norm": window["grad_norm"],
                   "epoch": self.state.step / self.updates_per_epoch,
                   "images_seen": self.state.step * self.global_batch,
                   "images_per_s": window["updates"] * self.global_batch / max(window["time"], 1e-9), **wd_metrics}
        if self.nonfinite.skipped:
            metrics["skipped_updates"] = self.nonfinite.skipped
        self.logger.log(metrics, step=self.state.step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    # -- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval_loss (mean cross-entropy), top1 and top5 (%) over every validation image, counted once over all
        ranks (rank r takes images r, r + W, ...), in batches of 1.5 x --batch_size as the official code; the same
        with the prefix ema_ for the EMA (--model_ema_eval). One decode per image serves both models."""
        models = [("", self.raw_model)]
        if self.ema is not None and self.config.model_ema_eval:
            models.append(("ema_", self.ema.module))
        sums = torch.zeros(len(models), 4, dtype=torch.float64, device=self.info.device)  # loss, top1, top5, images
        indices = eval_indices(len(self.val_samples), self.info.rank, self.info.world_size)
        size = max(1, int(1.5 * self.config.batch_size))
        keys = (indices[i:i + size] for i in range(0, len(indices), size))
        self.raw_model.eval()
        for images, targets in load_batches(self.val_samples, keys, num_workers=self.config.num_workers,
                                            pin_memory=self.config.pin_mem):
            images = images.to(self.info.device, non_blocking=True)
            targets = targets.to(self.info.device, non_blocking=True)
            for k, (_, model) in enumerate(models):
                with self.autocast:
                    logits = model(images).float()
                top1, top5 = topk_correct(logits, targets)  # on the device: one read at the end, not per batch
                sums[k] += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(), top1.double(),
                                        top5.double(), torch.tensor(len(targets), dtype=torch.float64, device=sums.device)])
        self.raw_model.train()
        sums = dist.all_reduce_sum(sums).tolist()
        result: dict[str, float] = {}
        for (prefix, _), (loss, top1, top5, count) in zip(models, sums):
            result.update({f"{prefix}eval_loss": loss / count, f"{prefix}top1": 100.0 * top1 / count,
                           f"{prefix}top5": 100.0 * top5 / count})
        result["eval_images"] = int(sums[0][3])
        return result

    def evaluate_and_log(self) -> dict[str, float]:
        result = self.evaluate()
        for key in ("top1", "ema_top1"):
            if key in result:
                self.state.best[key] = max(self.state.best.get(key, 0.0), result[key])
                result[f"{key}_best"] = self.state.best[key]
        result["epoch"] = self.state.step / self.updates_per_epoch
        self.logger.log(result, step=self.state.step)
        if self.info.is_main:
            ema = (f"; EMA top-1 {result['ema_top1']:.2f}%, top-5 {result['ema_top5']:.2f}%"
                   if "ema_top1" in result else "")
            tqdm.write(f"epoch {result['epoch']:g} (update {self.state.step}): top-1 {result['top1']:.2f}%, top-5 "
                       f"{result['top5']:.2f}%, loss {result['eval_loss']:.4f} on {result['eval_images']:,} val "
                       f"images{ema}; best top-1 {self.state.best['top1']:.2f}%")
        return result

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self) -> None:
        """Every rank contributes its RNG states (the default torch generator drives drop path); rank 0 writes
        model_<update> (model.safetensors, model_ema.safetensors, training_state.pt, manifest.json), then keeps
        the newest --save_ckpt_num checkpoints. A save that fails (a full disk) raises its RunFault on every rank."""
        rng_states = dist.all_gather_objects(rng_state())

        def write() -> None:
            config = self.config
            state = {"step": self.state.step, "epoch": self.state.step / self.updates_per_epoch,
                     "train_time": self.state.train_time, "best": dict(self.state.best),
                     "nonfinite": self.nonfinite.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "wd_scheduler": self.wd_scheduler.state_dict(),
                     "rng": rng_states, "layout": self.layout(), "wandb_id": self.logger.wandb_id,
                     "config": config.to_dict()}
            extra = {"model_ema": self.ema.state_dict()} if self.ema is not None else None
            path = save_checkpoint(self.run_dir, self.state.step, self.raw_model, state, extra, resume_flag="--resume")
            prune_checkpoints(self.run_dir, config.save_ckpt_num, self.state.step)
            tqdm.write(f"saved {path}")

        dist.on_main(write)

    def layout(self) -> dict[str, int]:
        return run_layout(self.config, self.info.world_size, len(self.train_samples))


def run_layout(config: ViTConfig, world_size: int, train_images: int) -> dict[str, int]:
    """What fixes the data order, the augmentation draws and the RNG streams: a checkpoint resumes exactly only
    under the same values (alphadecay/vit/run.py checks them)."""
    return {"world_size": world_size, "batch_size": config.batch_size, "update_freq": config.update_freq,
            "train_images": train_images, "seed": config.seed}
