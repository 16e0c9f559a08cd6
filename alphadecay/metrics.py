"""Rank-0 logging: a JSON-lines file in the run directory, and wandb (offline unless the user says otherwise).

metrics.jsonl holds one object per logged event, with the same keys wandb gets: `step` (updates completed) and,
for training updates, `loss`, `lr`, `weight_decay`, `tokens_seen`, `tokens_per_s` (and on CUDA
`tokens_per_s_per_device` and, on a GPU of known peak, `mfu`: alphadecay/mfu.py); for evaluations `eval_loss`,
`eval_ppl` (token-weighted) and `eval_loss_official`, `eval_ppl_official` (the official estimator); for
module-wise decay passes `alpha/<module>` (or `<metric>/<module>`), `wd/<module>` and their summaries; for AWD
`awd/lambda_t`, `awd/lambda_bar`; for the scaling-rule diagnostics `sigma_max/<module>`, `gain/attn/<layer>`,
`gain/mlp/<layer>`; and at every (re)start a `provenance` event: what changes the numbers without being a flag
(world size, micro-batch, accumulation, resolved dtype and optimizer kernel, evaluation layout, torch and
transformers versions; wandb has it in its config). The ViT (vit_main.py) logs `loss`, `lr`, `weight_decay`,
`epoch`, `images_seen`, `images_per_s` per update, `top1`, `top5`, `eval_loss` (and `ema_` ones, `top1_best`) per
epoch, and the same weight-decay keys. wandb is never required: if it is missing or cannot start,
a warning is printed and the JSON file still gets everything.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class MetricsLogger:
    def __init__(self, run_dir: str, *, enabled: bool, project: str, name: str, mode: str | None, config: dict,
                 resume_step: int = 0, wandb_id: str | None = None, tags: list[str] | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb_run = None
        if not enabled:
            return
        self._truncate_after(resume_step)  # a fresh run (step 0) starts a fresh file
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode != "disabled":
            self.wandb_run = self._start_wandb(run_dir, project, name, mode, config, wandb_id, tags)

    def _truncate_after(self, step: int) -> None:
        """Drop events logged after the checkpoint we resume from: the resumed run logs them again."""
        if not os.path.exists(self.path):
            return
        kept = [json.dumps(event) + "\n" for event in read_metrics(self.path) if event.get("step", 0) <= step]
        with open(self.path, "w") as fh:  # a half-written last line (a killed run) is dropped with the rest
            fh.writelines(kept)

    @staticmethod
    def _start_wandb(run_dir, project, name, mode, config, wandb_id, tags):
        try:
            import wandb

            return wandb.init(project=project, name=name, dir=run_dir, mode=mode, config=config, id=wandb_id,
                              resume="allow" if wandb_id else None, tags=tags, settings=wandb.Settings(silent=True))
        except Exception as err:  # noqa: BLE001 - logging must never stop training
            print(f"warning: wandb could not start ({type(err).__name__}: {err}); logging to metrics.jsonl only",
                  file=sys.stderr)
            return None

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.record(metrics, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def record(self, event: dict[str, Any], step: int) -> None:
        """An event for metrics.jsonl only (not a time series for wandb), e.g. the run's provenance."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **{k: _clean(v) for k, v in event.items()}}) + "\n")

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl file (a run directory or the file itself).

    A last line that is not valid JSON is skipped: a run that is still going (or was killed) may be in the middle
    of writing it. An invalid line anywhere else raises json.JSONDecodeError.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return events
