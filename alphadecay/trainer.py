"""The training loop: one update per iteration, evaluation, logging and checkpoints on their cadences.

One update (`train_step`; alphadecay/update.py has what both model families share):
  1. count the target tokens of all micro-batches on all ranks (an all-reduce on the device; no host wait);
  2. forward/backward each micro-batch with loss = sum of token losses / global target tokens (times the world
     size, which DDP's and FSDP's gradient averaging divides out), DDP's `no_sync` on all but the last
     micro-batch (FSDP reduce-scatters every micro-batch: alphadecay/parallel.py): the gradient is exactly that
     of the token-mean loss over the global batch, however it is split into ranks and micro-batches (the
     official code averages per-micro-batch means instead; identical when GA=1 on one GPU);
  3. the global gradient norm (clipped with --grad_clipping; also over FSDP's sharded gradients), then one
     all-reduce of the loss sum, the stop flag that SIGTERM/SIGINT raise on any rank and each rank's non-finite
     flag, so every rank takes the same decisions;
  4. the weight-decay scheduler (alphadecay.wd: it sets the groups' decays by name), then `optimizer.step()`;
  5. the one host read of the update (counts, loss, gradient norm, flags). A non-finite loss or gradient norm
     ends the run (--nonfinite stop) or drops the update (--nonfinite skip, read before step 4).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from alphadecay import dist, parallel, sharded_checkpoint
from alphadecay.checkpoint import prune_checkpoints, rng_state, save_checkpoint
from alphadecay.config import TrainConfig
from alphadecay.data import IGNORE_INDEX, Prefetcher, RowSpec
from alphadecay.errors import HubUnavailable
from alphadecay.evaluate import evaluate_rows
from alphadecay.loss import CausalLMLoss
from alphadecay.mfu import device_peak_flops, llama_flops_per_token, throughput_metrics
from alphadecay.optim import lr_factor, set_learning_rate
from alphadecay.update import NonfiniteGuard, Outcome, finish_update, gradient_norm, to_device
from alphadecay import wd
from alphadecay.wd.groups import mean_weight_decay


@dataclass
class TrainState:
    step: int = 0  # updates completed
    tokens_seen: int = 0  # non-pad input tokens, all ranks
    train_time: float = 0.0  # seconds spent in updates (not evaluation or checkpointing)
    extra: dict[str, Any] = field(default_factory=dict)


class StopFlag:
    """Set by SIGTERM/SIGINT; the run saves a checkpoint after the current update and exits.

    SIGTERM stays handled until the checkpoint is written (`uninstall`): under SLURM the job step and torchrun
    each send SIGTERM to a worker, milliseconds apart, and the second must not kill it mid-save. Only a second
    SIGINT (Ctrl-C twice) acts at once, through the handler that was there before (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, *, config: TrainConfig, info: dist.DistInfo, model: torch.nn.Module,
                 raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, wd_scheduler, train_batches,
                 eval_rows: torch.Tensor | None, row_spec: RowSpec | None, logger, run_dir: str, total_steps: int,
                 grad_accum: int, autocast: contextlib.AbstractContextManager, state: TrainState,
                 probes: list | None = None):
        if model is raw_model:
            raise TypeError("Trainer: `model` is the module train_step runs, forward(input_ids, labels) -> token-loss "
                            "sum (alphadecay.loss.CausalLMLoss, possibly compiled/DDP-wrapped), not the raw model")
        self.config, self.info, self.model, self.raw_model = config, info, model, raw_model
        self.optimizer, self.wd_scheduler, self.logger = optimizer, wd_scheduler, logger
        self.train_batches, self.run_dir = train_batches, run_dir
        # The evaluation set (data.build_eval_rows): the same rows on every rank; labels come from row_spec.
        self.eval_rows, self.row_spec = eval_rows, row_spec
        self.total_steps, self.grad_accum, self.autocast, self.state = total_steps, grad_accum, autocast, state
        # Read-only measurements on their own cadence: objects with due(step, done) -> bool and
        # __call__(model) -> dict of floats (identical on every rank); see alphadecay/diagnostics.py.
        self.probes = list(probes or [])
        self.stop = StopFlag()
        self.saved_step = state.step  # the newest update with a checkpoint (the resumed one, or 0: none needed)
        self.data_state: dict | None = None
        self.nonfinite = NonfiniteGuard(config.nonfinite, config.max_skipped_updates)
        self.last_loss: float | None = None  # the last logged training loss, for the console
        # For tokens_per_s_per_device and mfu (CUDA only; alphadecay/mfu.py).
        llama = getattr(getattr(raw_model, "config", None), "model_type", None) == "llama"
        self.flops_per_token = llama_flops_per_token(raw_model.config, config.max_length) if llama else None
        self.peak_flops = device_peak_flops(info.device, config.peak_tflops)

    @classmethod
    def for_updates(cls, config: TrainConfig, info: dist.DistInfo, model: torch.nn.Module, optimizer,
                    wd_scheduler: wd.Scheduler | None = None, raw_model: torch.nn.Module | None = None) -> Trainer:
        """A trainer that only runs `train_step` on batches it is given: no data, evaluation, logging or saving
        (for tests and benchmarks). `model` is the raw model (then wrapped in CausalLMLoss with
        --loss_chunk_tokens), or, with `raw_model` given, the module train_step runs. Without a weight-decay
        scheduler, Uniform."""
        if raw_model is None or model is raw_model:
            raw_model, model = model, CausalLMLoss(model, config.loss_chunk_tokens)
        wd_scheduler = wd_scheduler or wd.create("uniform", raw_model, optimizer)
        return cls(config=config, info=info, model=model, raw_model=raw_model, optimizer=optimizer,
                   wd_scheduler=wd_scheduler, train_batches=None, eval_rows=None, row_spec=None, logger=None,
                   run_dir="", total_steps=0, grad_accum=1, autocast=contextlib.nullcontext(), state=TrainState())

    # -- one update ------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> Outcome:
        """One optimizer update (module docstring; alphadecay/update.py): the host reads the device once, after the
        optimizer step is queued (before it with --nonfinite skip). Returns the Outcome: loss sum over all ranks,
        counts [targets, input tokens] over all ranks, gradient norm, stop flag, non-finite ranks, decay metrics."""
        device, info = self.info.device, self.info
        host = torch.stack([torch.stack([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro_batches]).sum(),
                            torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro_batches]).sum()])
        counts = dist.all_reduce_sum(to_device(host.double(), device))  # [targets, non-pad input tokens]
        scale = info.world_size / counts[0].clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            with parallel.micro_batch_context(self.model, last=i == len(micro_batches) - 1), self.autocast:
                micro_loss = self.model(batch["input_ids"].to(device, non_blocking=True),
                                        batch["labels"].to(device, non_blocking=True))
            (micro_loss * scale).backward()
            loss_sum += micro_loss.detach().double()
        grad_norm = gradient_norm(self.raw_model.parameters(), self.config.grad_clipping)
        outcome = Outcome.start(counts, loss_sum, grad_norm, self.stop.raised, info)
        return finish_update(outcome, nonfinite=self.config.nonfinite, wd_scheduler=self.wd_scheduler,
                             optimizer=self.optimizer)

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        config, is_main = self.config, self.info.is_main
        batches = Prefetcher(self.train_batches, device=self.info.device)
        self.stop.install()
        window = self._empty_window()
        # In a log file (not a terminal) the bar redraws at most every 30 s instead of several times a second.
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not is_main, dynamic_ncols=True,
                   desc="train", mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            for step in range(self.state.step, self.total_steps):
                lr = config.lr * lr_factor(step, total_steps=self.total_steps, warmup_steps=config.warmup_steps,
                                           schedule=config.scheduler, min_lr_ratio=config.min_lr_ratio)
                set_learning_rate(self.optimizer, lr)
                micro = self.next_micro_batches(batches)
                self.data_state = micro[-1][1]
                start = time.perf_counter()  # the previous update's read (or an evaluation) left the GPU idle
                outcome = self.train_step([b for b, _ in micro])
                elapsed = time.perf_counter() - start  # up to the read: the GPU's work is done
                targets, tokens = outcome.counts
                self.state.step, self.state.tokens_seen = step + 1, self.state.tokens_seen + int(tokens)
                self.state.train_time += elapsed
                self.nonfinite.check(outcome, self.state.step, logger=self.logger,
                                     run_dir=self.run_dir)
                stop = outcome.stop
                if outcome.applied:
                    window["loss"] += outcome.loss_sum
                    window["targets"] += int(targets)
                window["tokens"] += int(tokens)
                window["positions"] += sum(b["input_ids"].numel() for b, _ in micro)  # this rank's, pads included
                window["time"] += elapsed
                window["grad_norm"] = outcome.grad_norm
                done = self.state.step == self.total_steps
                if self.state.step % config.log_every == 0 or done:
                    self._log_train(window, lr, bar, {**window["wd"], **outcome.wd_metrics})
                    window = self._empty_window()
                elif self.wd_scheduler.passed:  # a module-wise pass: a record at its own update
                    self.logger.log(outcome.wd_metrics, step=self.state.step)
                else:  # metrics of every update (AWD's, a form's): the latest go into the next log line
                    window["wd"].update(outcome.wd_metrics)
                bar.update(1)
                for probe in self.probes:
                    if probe.due(self.state.step, done):
                        self.logger.log(probe(self.raw_model), step=self.state.step)
                if self.state.step % config.eval_every == 0 or done:
                    self.evaluate_and_log()
                if self.state.step % config.save_every == 0 or done or stop:
                    self.save(final=done)
                if stop:
                    bar.write(f"stopped by signal after update {self.state.step}; checkpoint saved in {self.run_dir}")
                    break
        finally:
            bar.close()
            batches.close()
            self.stop.uninstall()
        return self.state

    def next_micro_batches(self, batches) -> list:
        """The next update's (batch, data state) pairs. When streamed data stays unreadable on a rank past
        --hub_retry_seconds (HubUnavailable), every rank saves the last completed update and stops with that error.
        Ranks agree through one all-reduce per update, made only where that can happen (hub data, several ranks)."""
        try:
            micro, failure = [next(batches) for _ in range(self.grad_accum)], None
        except HubUnavailable as err:
            micro, failure = None, err
        if self.info.distributed and getattr(self.train_batches, "remote", False):
            flag = torch.tensor([float(failure is not None)], device=self.info.device)
            if dist.all_reduce_sum(flag).item() > 0:
                failure = HubUnavailable(" ".join(str(m) for m in dist.all_gather_objects(failure) if m is not None))
        if failure is None:
            return micro
        if self.state.step > self.saved_step:
            self.save()
        kept = (f"update {self.state.step} is saved in {self.run_dir}/model_{self.state.step}" if self.state.step
                else "no update was done yet, so there is nothing to save")
        raise HubUnavailable(f"{failure} The run stopped: {kept}. Once the hub answers again, resume with "
                             f"--continue_from {self.run_dir} (a larger --hub_retry_seconds rides out longer "
                             "outages).")

    @staticmethod
    def _empty_window() -> dict:
        """Sums over the updates since the last training log line (host values: no synchronisation to log)."""
        return {"loss": 0.0, "targets": 0, "tokens": 0, "positions": 0, "time": 0.0, "grad_norm": math.nan, "wd": {}}

    def _log_train(self, window: dict, lr: float, bar, extra: dict) -> None:
        loss = window["loss"] / window["targets"] if window["targets"] else math.nan
        metrics = {"loss": loss, "lr": lr, "weight_decay": mean_weight_decay(self.optimizer.param_groups),
                   "tokens_seen": self.state.tokens_seen, "grad_norm": window["grad_norm"],
                   "tokens_per_s": window["tokens"] / max(window["time"], 1e-9)}
        if self.nonfinite.skipped:
            metrics["skipped_updates"] = self.nonfinite.skipped
        if self.data_state and "epoch" in self.data_state:  # pretokenized data: passes over the train split
            metrics["epoch"] = self.data_state["epoch"]
        if self.info.device.type == "cuda":
            metrics.update(throughput_metrics(positions=window["positions"], seconds=window["time"],
                                              flops_per_token=self.flops_per_token, peak_flops=self.peak_flops))
        metrics.update(extra)
        self.logger.log(metrics, step=self.state.step)
        self.last_loss = loss
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """eval_loss (token mean) and eval_loss_official (the official estimator over global batches of
        --official_eval_rows rows) on the evaluation set, identical for any world size and --batch_size
        (alphadecay/evaluate.py)."""
        return evaluate_rows(self.raw_model, self.eval_rows, self.row_spec, info=self.info,
                             batch_size=self.config.batch_size, official_eval_rows=self.config.official_eval_rows,
                             chunk_tokens=self.config.loss_chunk_tokens, autocast=self.autocast)

    def evaluate_and_log(self) -> dict[str, float]:
        result = self.evaluate()
        self.logger.log(result, step=self.state.step)
        if self.info.is_main:
            train = f"train loss {self.last_loss:.4f}, " if self.last_loss is not None else ""
            tqdm.write(f"step {self.state.step}: {train}eval loss {result['eval_loss']:.4f}, perplexity "
                       f"{result['eval_ppl']:.2f} (official estimator {result['eval_ppl_official']:.2f}) "
                       f"on {result['eval_tokens']:,} tokens")
        return result

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, final: bool = False) -> None:
        """Every rank contributes its data position and RNG state; rank 0 writes the checkpoint (under FSDP every
        rank writes its shards: alphadecay/sharded_checkpoint.py; the `final` one also as save_pretrained), then
        deletes those beyond --keep_checkpoints. A save that fails (a full disk) raises its RunFault on every rank."""
        data_states = dist.all_gather_objects(self.data_state)
        rng_states = dist.all_gather_objects(rng_state())
        state = {"step": self.state.step, "tokens_seen": self.state.tokens_seen, "train_time": self.state.train_time,
                 "nonfinite": self.nonfinite.state_dict(), "wd_scheduler": self.wd_scheduler.state_dict(),
                 "data": data_states, "rng": rng_states, "world_size": self.info.world_size,
                 "wandb_id": self.logger.wandb_id, "config": self.config.to_dict()}

        def prune(path: str) -> None:
            deleted = prune_checkpoints(self.run_dir, self.config.keep_checkpoints, self.state.step)
            tqdm.write(f"saved {path}" + (f" (deleted {', '.join(deleted)}: --keep_checkpoints)" if deleted else ""))

        def write() -> None:
            prune(save_checkpoint(self.run_dir, self.state.step, self.raw_model,
                                  {**state, "optimizer": self.optimizer.state_dict()}))

        if parallel.is_sharded(self.raw_model):  # a collective: every rank writes, each stops on a failure
            path = sharded_checkpoint.save(self.run_dir, self.state.step, self.raw_model, self.optimizer, state,
                                           full_model=final)
            dist.on_main(prune, path)
        else:
            dist.on_main(write)
        self.saved_step = self.state.step
