"""What both training loops (LLaMA's trainer.py, the ViT's vit/train.py) do around one optimizer update without making
the GPU wait: the counts stay on the device, every rank's outcome travels in one all-reduce, and the host reads the
device once per update.

One update, as both loops run it:
  1. counts the loss is normalised by (LLaMA: target tokens) go to the device without a host synchronisation
     (`to_device`: pinned memory, asynchronous copy) and are all-reduced there; the normalisation is a device tensor;
  2. forward/backward of every micro-batch; the loss sum accumulates on the device;
  3. the global gradient norm (`gradient_norm`, clipping with --grad_clipping > 0), on the device;
  4. `Outcome.start`: one all-reduce of [loss sum, stop flag, one non-finite flag per rank], asynchronous;
  5. the weight-decay scheduler's step, then `optimizer.step()`, queued;
  6. `Outcome.read`: the one host synchronisation, after the step is queued: the reduced values, the counts and the
     gradient norm in one `.tolist()`. Timing an update from its start to this read measures the GPU's work, not the
     host's queueing (a throughput window is a sum of such intervals; evaluation, checkpoints and probes fall outside).
With `--nonfinite skip` the read comes before step 5 instead (the update must be dropped before it is applied): the
GPU then idles while the host launches the optimizer's kernels. What else synchronises: AWD reads ||g|| / ||w|| before
the step (its decay is a host float torch's optimizer needs before it runs); a module-wise pass (every
--unbalancedWD_every updates) computes and broadcasts its decays; logging and evaluation read host values they
already have.

A non-finite loss or gradient norm (`NonfiniteGuard`): with `stop` (default) the run ends at that update without
saving anything from it, after a `nonfinite` event in metrics.jsonl and one paragraph that names the update, the last
checkpoint and what to try; with `skip` the update is dropped on every rank (no optimizer or weight-decay step; the
update index, the data and the learning-rate schedule move on, as Megatron-LM counts skipped iterations) and the run
stops as above after --max_skipped_updates in a row. The gradient norm is global (DDP has reduced the gradients;
FSDP's shards' norms are summed over the ranks), and the per-rank loss flags are summed in step 4, so every rank
takes the same decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from alphadecay import dist, parallel
from alphadecay.checkpoint import latest_checkpoint
from alphadecay.errors import RunDiverged


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host synchronisation (CUDA: pinned, copied asynchronously)."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def gradient_norm(parameters, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping, on the device; clips to `max_norm` when it is > 0. On FSDP's
    sharded gradients too: the norm over all the shards, the same plain tensor on every rank
    (`parallel.clip_grad_norm`, which on plain tensors is torch's clip_grad_norm_)."""
    return parallel.clip_grad_norm(parameters, max_norm, foreach=True)


@dataclass
class Outcome:
    """One update's values that the host needs, reduced over ranks and read once."""

    counts: torch.Tensor  # already reduced (step 1), float64 on the device
    loss_sum: float = math.nan  # over all ranks
    grad_norm: float = math.nan  # global, before clipping
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT)
    nonfinite_ranks: list[int] = field(default_factory=list)  # ranks whose loss was not finite
    wd_metrics: dict = field(default_factory=dict)
    applied: bool = True  # False when --nonfinite skip dropped the update
    _pending: torch.Tensor | None = None

    @classmethod
    def start(cls, counts: torch.Tensor, loss_sum: torch.Tensor, grad_norm: torch.Tensor, stop: bool,
              info: dist.DistInfo) -> Outcome:
        """Issue the all-reduce of [loss sum, stop, non-finite flag of each rank] (step 4); nothing is read yet."""
        local = torch.zeros(2 + info.world_size, dtype=torch.float64, device=counts.device)
        local[0] = loss_sum
        local[1] = float(stop)
        local[2 + info.rank] = (~torch.isfinite(loss_sum)).double()
        reduced = dist.all_reduce_sum(local)
        outcome = cls(counts=counts)
        outcome._pending = torch.cat([reduced, counts, grad_norm.detach().double().reshape(1)])
        return outcome

    def read(self) -> Outcome:
        """The host synchronisation (step 6); idempotent."""
        if self._pending is not None:
            values = self._pending.tolist()
            world = len(values) - 3 - len(self.counts)
            self.loss_sum, self.stop = values[0], values[1] > 0
            self.nonfinite_ranks = [r for r in range(world) if values[2 + r] > 0]
            self.counts = values[2 + world:-1]
            self.grad_norm = values[-1]
            self._pending = None
        return self

    @property
    def finite(self) -> bool:
        return not self.nonfinite_ranks and math.isfinite(self.grad_norm)


def finish_update(outcome: Outcome, *, nonfinite: str, wd_scheduler, optimizer, after_step=None) -> Outcome:
    """Steps 5 and 6 of an update, as both loops take them: the weight-decay scheduler and `optimizer.step()`
    (then `after_step()`, e.g. the ViT's EMA) are queued and the device is read; with --nonfinite skip the read
    comes first, and a non-finite update is dropped on every rank (the scheduler counts it, nothing is applied)."""
    if nonfinite == "skip" and not outcome.read().finite:
        wd_scheduler.skip()
        outcome.applied = False
    else:
        outcome.wd_metrics = wd_scheduler.step() or {}  # alphadecay.wd: it counts the updates itself
        optimizer.step()
        if after_step is not None:
            after_step()
    optimizer.zero_grad(set_to_none=True)
    return outcome.read()


class NonfiniteGuard:
    """--nonfinite {stop,skip} and --max_skipped_updates (module docstring)."""

    ADVICE = ("Try a lower --lr, a longer --warmup_steps, gradient clipping (--grad_clipping 1.0, or --clip_grad for "
              "the ViT) or float32 master weights (--dtype amp_bf16)")

    def __init__(self, mode: str, max_skipped: int):
        self.mode, self.max_skipped = mode, max_skipped
        self.skipped = 0  # updates dropped in all
        self.in_a_row = 0

    def check(self, outcome: Outcome, update: int, *, logger, run_dir: str | None) -> None:
        """After update `update` (1-based: updates completed) was read: count a skip, or end the run."""
        if outcome.finite:
            self.in_a_row = 0
            return
        event = {"update": update, "loss": outcome.loss_sum, "grad_norm": outcome.grad_norm,
                 "ranks": outcome.nonfinite_ranks, "action": self.mode}
        if self.mode == "skip":
            self.skipped += 1
            self.in_a_row += 1
            event["in_a_row"] = self.in_a_row
            if self.in_a_row > self.max_skipped:
                event["action"] = "stop"
        if logger is not None:
            logger.record({"nonfinite": event}, step=update)
        if event["action"] == "skip":
            return
        what = (f"the loss is not finite ({outcome.loss_sum} summed; on rank(s) "
                f"{', '.join(map(str, outcome.nonfinite_ranks))})" if outcome.nonfinite_ranks
                else f"the gradient norm is not finite ({outcome.grad_norm})")
        last_checkpoint = latest_checkpoint(run_dir) if run_dir else None
        where = (f"The last checkpoint is {last_checkpoint}; resume from it with --continue_from (--resume for the "
                 "ViT) after changing what diverged." if last_checkpoint else "No checkpoint was written before it.")
        repeated = (f" after {self.in_a_row - 1} skipped update(s) in a row (--nonfinite skip, "
                    f"--max_skipped_updates {self.max_skipped})" if self.mode == "skip" else "")
        raise RunDiverged(f"update {update}: {what}{repeated}, so the run stops without saving anything from this "
                        f"update (--nonfinite {self.mode}). {where} {self.ADVICE}; or --nonfinite skip to drop such "
                        "updates and go on.")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))
