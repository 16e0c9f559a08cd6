"""The weight-decay methods in PyTorch Lightning: a callback.

    from alphadecay.integrations.lightning import WeightDecayCallback
    import alphadecay.wd as wd

    class LM(pl.LightningModule):
        def configure_optimizers(self):   # per-module groups, so that each module can have its own decay
            return torch.optim.AdamW(wd.module_param_groups(self, weight_decay=0.1), lr=3e-4)

    pl.Trainer(callbacks=[WeightDecayCallback("alphadecay", every=500)], ...).fit(LM(), data)

Where it acts (pytorch-lightning 2.x, plugins/precision/precision.py `_after_closure`): `on_before_optimizer_step`,
once per optimizer update (on the last micro-batch under `accumulate_grad_batches`), after the closure has run the
backward pass (and, under AMP, after the gradients were unscaled) and BEFORE Lightning clips them
(`gradient_clip_val`): unlike the Hugging Face Trainer and torchrun_main.py, a method that reads gradients sees them
unclipped. AlphaDecay reads the weights only and is unaffected; AdaDecay z-scores gradient norms within a block, which
clipping by the global norm rescales alike (unaffected; value clipping is not); AWD's ||g|| / ||w|| is the unclipped
norm, so whenever clipping is active its decay is larger than with the other two. To get their order, clip in the
LightningModule's own `on_before_optimizer_step` and call the scheduler there (README, "Lightning").

The scheduler is built in `on_fit_start` from the LightningModule and its one optimizer, so an optimizer whose groups
a method cannot address is an error before the first update. Metrics go to `pl_module.log_dict` at their update.
`state_dict()` / `load_state_dict()` put the scheduler (update count, method state) in Lightning's checkpoints; the
per-group decays travel in the optimizer's state, so `Trainer.fit(..., ckpt_path=...)` resumes exactly.
"""

from __future__ import annotations

from typing import Any

try:
    import pytorch_lightning as pl
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(f"alphadecay.integrations.lightning needs pytorch-lightning: pip install "
                              f"'alphadecay[lightning]' ({err})", name=err.name) from None

import alphadecay.wd as wd
from alphadecay.wd.registry import WeightDecayError, resolve_options

LIGHTNING_HINT = ("In Lightning, return per-module groups from configure_optimizers: "
                  "torch.optim.AdamW(alphadecay.wd.module_param_groups(self, weight_decay), lr=...).")


class WeightDecayCallback(pl.Callback):
    """The weight-decay method `name` (alphadecay.wd.available()) with its options, applied by Lightning once per
    optimizer update. `scheduler` is the alphadecay.wd Scheduler once fitting has started."""

    def __init__(self, name: str, **options: Any):
        resolve_options(name, options)  # an unknown method, option or value is an error here, before any training
        self.name, self.options = name, dict(options)
        self.scheduler: wd.Scheduler | None = None
        self._restored: dict | None = None  # a checkpoint's state, until the scheduler exists

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise WeightDecayError(f"WeightDecayCallback({self.name!r}) sets the decays of one optimizer; "
                                   f"configure_optimizers returned {len(trainer.optimizers)}.")
        try:
            self.scheduler = wd.create(self.name, pl_module, trainer.optimizers[0], **self.options)
        except WeightDecayError as err:
            raise WeightDecayError(f"{err} {LIGHTNING_HINT}") from None
        if self._restored is not None:
            self.scheduler.load_state_dict(self._restored)
            self._restored = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.scheduler is None or optimizer is not self.scheduler.optimizer:
            raise WeightDecayError("WeightDecayCallback: Lightning is stepping an optimizer the callback was not "
                                   "bound to at fit start; it supports one optimizer, under automatic optimization.")
        metrics = self.scheduler.step()
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        if self.scheduler is None:
            return dict(self._restored or {})
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict)
        else:
            self._restored = dict(state_dict)
