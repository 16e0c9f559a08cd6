"""The weight-decay methods in the Hugging Face Trainer: a callback, and per-module optimizer groups.

    from alphadecay.integrations.hf import WeightDecayCallback
    import alphadecay.wd as wd

    optimizer = torch.optim.AdamW(wd.module_param_groups(model, weight_decay=0.1), lr=3e-4)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                      callbacks=[WeightDecayCallback("alphadecay", every=500)])
    # or, letting the Trainer build the optimizer:
    #   Trainer(..., optimizer_cls_and_kwargs=module_groups_optimizer(torch.optim.AdamW, weight_decay=0.1, lr=3e-4))

Where it acts (transformers 5.x, trainer.py `_run_epoch`): `on_pre_optimizer_step`, which the Trainer calls once per
optimizer update (on the last micro-batch of a gradient-accumulation cycle), after gradient clipping and before
`optimizer.step()`: the gradients there are the whole update's, clipped, as in `torchrun_main.py`. The scheduler is
built in `on_train_begin` from the Trainer's model and optimizer (accelerate's AcceleratedOptimizer, whose
`param_groups` are the inner optimizer's): an optimizer whose groups a method cannot address is an error before the
first update.

Logging: the metrics of a module-wise pass (`alpha/<module>`, `wd/<module>`, ...) get a log record of their own at
that update (the callback asks the Trainer to log then), other metrics (AWD's `awd/lambda_bar`, every update) go into
the Trainer's next log record. They land in `trainer.state.log_history` (and trainer_state.json) and in the `logs`
that callbacks after this one see; `report_to` integrations run before user callbacks, so to have them log these too,
put the callback first: `trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))`.

Resuming: the scheduler's state (its update count and the method's state, e.g. AWD's moving average) is an
ExportableState, saved in every checkpoint's trainer_state.json; the per-group decays travel in the optimizer's
state_dict. `trainer.train(resume_from_checkpoint=...)` restores both, whether or not
`restore_callback_states_from_checkpoint` is set, so the resumed run has the same decays and the same next passes
as one that never stopped. A checkpoint written without the callback starts the method fresh at its update.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(f"alphadecay.integrations.hf needs transformers (and accelerate, for the Trainer): "
                              f"pip install 'alphadecay[hf]' ({err})", name=err.name) from None

import alphadecay.wd as wd
from alphadecay.wd.registry import WeightDecayError, resolve_options

TRAINER_HINT = ("With the Hugging Face Trainer, give it per-module groups: Trainer(..., optimizers=(torch.optim."
                "AdamW(alphadecay.wd.module_param_groups(model, weight_decay), lr=...), None)) or Trainer(..., "
                "optimizer_cls_and_kwargs=alphadecay.integrations.hf.module_groups_optimizer(torch.optim.AdamW, "
                "weight_decay=..., lr=...)); the Trainer's own optimizer puts every decayed weight in one group.")


class WeightDecayCallback(TrainerCallback, ExportableState):
    """The weight-decay method `name` (alphadecay.wd.available()) with its options, applied by the Trainer once per
    optimizer update. `scheduler` is the alphadecay.wd Scheduler once training has begun
    (`callback.scheduler.last_weight_decays()` gives the current per-module decays)."""

    def __init__(self, name: str, **options: Any):
        resolve_options(name, options)  # an unknown method, option or value is an error here, before any training
        self.name, self.options = name, dict(options)
        self.scheduler: wd.Scheduler | None = None
        self.scheduler_state: dict | None = None  # set by the Trainer when it restores callbacks from a checkpoint
        self._pending: dict[str, float] = {}  # metrics for the Trainer's next log record
        self._log_now = False

    # -- binding and resuming --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        try:
            self.scheduler = wd.create(self.name, model, optimizer, **self.options)
        except WeightDecayError as err:
            raise WeightDecayError(f"{err} {TRAINER_HINT}") from None
        self._pending, self._log_now = {}, False
        saved = _saved_state(state)  # (several WeightDecayCallbacks are an error)
        if state.global_step > 0:  # resumed from a checkpoint: its trainer_state.json holds our state
            saved = self.scheduler_state if self.scheduler_state is not None else saved
            if saved is not None:
                self.scheduler.load_state_dict(_decode(saved))
            else:
                self.scheduler.update = state.global_step
            if self.scheduler.update != state.global_step:
                raise WeightDecayError(f"the checkpoint's weight-decay scheduler state is at update "
                                       f"{self.scheduler.update}, its Trainer state at {state.global_step}: resume "
                                       "from the checkpoint directory as the Trainer wrote it.")
        self.scheduler_state = None

    def state(self) -> dict:
        scheduler = None if self.scheduler is None else _encode(self.scheduler.state_dict())
        return {"args": {"name": self.name, **self.options}, "attributes": {"scheduler_state": scheduler}}

    # -- once per optimizer update ---------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.scheduler is None:
            raise WeightDecayError("WeightDecayCallback: on_pre_optimizer_step before on_train_begin; add the "
                                   "callback to the Trainer (callbacks=[...]) before trainer.train().")
        if self.scheduler.update != state.global_step:
            raise WeightDecayError(f"WeightDecayCallback counted {self.scheduler.update} optimizer updates, the "
                                   f"Trainer {state.global_step}: one callback instance serves one Trainer at a time.")
        metrics = self.scheduler.step()
        if metrics:
            self._pending.update(metrics)
            self._log_now = self._log_now or self.scheduler.passed

    def on_step_end(self, args, state, control, **kwargs):
        if self._log_now:  # a module-wise pass: logged at its own update
            control.should_log = True
            self._log_now = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)  # the record Trainer.log has just appended
            self._pending = {}


def _saved_state(state) -> dict | None:
    saved = (state.stateful_callbacks or {}).get(WeightDecayCallback.__name__)
    if isinstance(saved, list):
        raise WeightDecayError("the Trainer has several WeightDecayCallbacks; give it one (two would set the decays "
                               "of the same optimizer).")
    return None if saved is None else saved.get("attributes", {}).get("scheduler_state")


def _encode(state: dict) -> dict:
    """A scheduler state for trainer_state.json: as it is when JSON keeps it exactly (the built-in methods' floats
    and dicts), else torch.save'd into base64."""
    try:
        if json.loads(json.dumps(state)) == state:
            return state
    except (TypeError, ValueError):
        pass
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {"torch.save": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _decode(saved: dict) -> dict:
    if set(saved) == {"torch.save"}:
        return torch.load(io.BytesIO(base64.b64decode(saved["torch.save"])), weights_only=False)
    return saved


class ModuleGroupsOptimizer:
    """An optimizer factory for `Trainer(optimizer_cls_and_kwargs=(ModuleGroupsOptimizer, kwargs))`: the Trainer
    instantiates it and calls it with the model and the kwargs (transformers' `is_optimizer_factory`)."""

    def __call__(self, model: torch.nn.Module, *, optimizer_cls: type, weight_decay: float, decay_norms: bool = True,
                 decay_embeddings: bool = True, **optimizer_kwargs: Any) -> torch.optim.Optimizer:
        groups = wd.module_param_groups(model, weight_decay, decay_norms=decay_norms,
                                        decay_embeddings=decay_embeddings)
        return optimizer_cls(groups, **optimizer_kwargs)


def module_groups_optimizer(optimizer_cls: type = torch.optim.AdamW, *, weight_decay: float, decay_norms: bool = True,
                            decay_embeddings: bool = True, **optimizer_kwargs: Any) -> tuple[type, dict]:
    """`optimizer_cls_and_kwargs` for the Trainer: `optimizer_cls` over alphadecay.wd.module_param_groups(model,
    weight_decay), with `optimizer_kwargs` (give `lr`: the Trainer's learning_rate does not reach a factory)."""
    return ModuleGroupsOptimizer, {"optimizer_cls": optimizer_cls, "weight_decay": weight_decay,
                                   "decay_norms": decay_norms, "decay_embeddings": decay_embeddings,
                                   **optimizer_kwargs}
