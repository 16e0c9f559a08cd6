"""The training loop: one update per iteration, evaluation, logging and checkpoints on their cadences.

One update (`train_step`):
  1. count the target tokens of all micro-batches on all ranks (one all-reduce, which also carries the stop flag
     that SIGTERM/SIGINT raise on any rank, so every rank stops at the same update);
  2. forward/backward each micro-batch with loss = sum of token losses / global target tokens (times the world
     size, which DDP's and FSDP's gradient averaging divides out), DDP's `no_sync` on all but the last
     micro-batch (FSDP reduce-scatters every micro-batch: alphadecay/parallel.py): the gradient is exactly that
     of the token-mean loss over the global batch, however it is split into ranks and micro-batches (the
     official code averages per-micro-batch means instead; identical when GA=1 on one GPU);
  3. optional gradient clipping (parallel.clip_grad_norm: also on FSDP's sharded gradients);
  4. the weight-decay scheduler (alphadecay.wd: it sets the groups' decays by name), then `optimizer.step()`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from alphadecay import dist, parallel, sharded_checkpoint
from alphadecay.checkpoint import rng_state, save_checkpoint
from alphadecay.config import TrainConfig
from alphadecay.data import IGNORE_INDEX, Prefetcher, RowSpec
from alphadecay.evaluate import evaluate_rows
from alphadecay.loss import CausalLMLoss, target_count
from alphadecay.mfu import device_peak_flops, llama_flops_per_token, throughput_metrics
from alphadecay.optim import lr_factor, set_learning_rate
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
        self.data_state: dict | None = None
        self.grad_norm: torch.Tensor | None = None  # before clipping, when --grad_clipping > 0
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
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int, int, bool, dict]:
        """One optimizer update; returns (local loss sum, global targets, global input tokens, stop, wd metrics)."""
        device = self.info.device
        inputs = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)  # non-pad input tokens
        counts = torch.tensor([sum(target_count(b["labels"]) for b in micro_batches), inputs,
                               float(self.stop.raised)], dtype=torch.float64, device=device)
        targets, inputs, stop = dist.all_reduce_sum(counts).tolist()
        scale = self.info.world_size / max(targets, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            with parallel.micro_batch_context(self.model, last=i == len(micro_batches) - 1), self.autocast:
                micro_loss = self.model(batch["input_ids"].to(device, non_blocking=True),
                                        batch["labels"].to(device, non_blocking=True))
            (micro_loss * scale).backward()
            loss_sum += micro_loss.detach().double()
        if self.config.grad_clipping > 0:
            self.grad_norm = parallel.clip_grad_norm(self.raw_model.parameters(), self.config.grad_clipping)
        wd_metrics = self.wd_scheduler.step() or {}  # alphadecay.wd: it counts the updates itself
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, int(targets), int(inputs), stop > 0, wd_metrics

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        config, is_main = self.config, self.info.is_main
        batches = Prefetcher(self.train_batches)
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
                micro = [next(batches) for _ in range(self.grad_accum)]
                self.data_state = micro[-1][1]
                start = time.perf_counter()
                loss_sum, targets, tokens, stop, wd_metrics = self.train_step([b for b, _ in micro])
                elapsed = time.perf_counter() - start
                self.state.step, self.state.tokens_seen = step + 1, self.state.tokens_seen + tokens
                self.state.train_time += elapsed
                window["loss"] += loss_sum
                window["targets"] += targets
                window["tokens"] += tokens
                window["positions"] += sum(b["input_ids"].numel() for b, _ in micro)  # this rank's, pads included
                window["time"] += elapsed
                done = self.state.step == self.total_steps
                if self.state.step % config.log_every == 0 or done:
                    self._log_train(window, lr, bar, wd_metrics)
                    window = self._empty_window()
                elif wd_metrics:  # a module-wise pass is logged at its own update
                    self.logger.log(wd_metrics, step=self.state.step)
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

    def _empty_window(self) -> dict:
        """Sums over the updates since the last training log line."""
        return {"loss": torch.zeros((), dtype=torch.float64, device=self.info.device), "targets": 0, "tokens": 0,
                "positions": 0, "time": 0.0}

    def _log_train(self, window: dict, lr: float, bar, extra: dict) -> None:
        loss_sum = dist.all_reduce_sum(window["loss"].clone()).item()
        loss = loss_sum / max(window["targets"], 1)
        metrics = {"loss": loss, "lr": lr, "weight_decay": mean_weight_decay(self.optimizer.param_groups),
                   "tokens_seen": self.state.tokens_seen,
                   "tokens_per_s": window["tokens"] / max(window["time"], 1e-9)}
        if self.grad_norm is not None:
            metrics["grad_norm"] = self.grad_norm.item()
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
        rank writes its shards: alphadecay/sharded_checkpoint.py; the `final` one also as save_pretrained)."""
        data_states = dist.all_gather_objects(self.data_state)
        rng_states = dist.all_gather_objects(rng_state())
        state = {"step": self.state.step, "tokens_seen": self.state.tokens_seen, "train_time": self.state.train_time,
                 "wd_scheduler": self.wd_scheduler.state_dict(), "data": data_states, "rng": rng_states,
                 "world_size": self.info.world_size, "wandb_id": self.logger.wandb_id, "config": self.config.to_dict()}
        if parallel.is_sharded(self.raw_model):
            path = sharded_checkpoint.save(self.run_dir, self.state.step, self.raw_model, self.optimizer, state,
                                           full_model=final)
        elif self.info.is_main:
            path = save_checkpoint(self.run_dir, self.state.step, self.raw_model,
                                   {**state, "optimizer": self.optimizer.state_dict()})
        if self.info.is_main:
            tqdm.write(f"saved {path}")
        dist.barrier()
