"""alphadecay.integrations.lightning in a real pytorch-lightning 2.6 Trainer (CPU): a LightningModule around the
1.1M LLaMA, gradient accumulation 2, every decay read from the optimizer Lightning steps."""

from __future__ import annotations


import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import alphadecay.wd as wd
from alphadecay.integrations.lightning import WeightDecayCallback
from alphadecay.model import build_model, load_model_config
from alphadecay.wd.methods.awd import global_norms
from alphadecay.wd.registry import WeightDecayError
from tests.conftest import TINY_CONFIG, alphadecay_pass_decays


class LM(pl.LightningModule):
    """The LLaMA and AdamW over per-module groups. Its own on_before_optimizer_step runs after the callbacks' and
    before Lightning's gradient clipping: it records the update, the decays the step will use, the gradient and weight
    norms as the callback saw them and, at the updates in `reference`, an AlphaDecay pass on a copy of the weights of
    that moment."""

    def __init__(self, per_module_groups: bool = True, reference: tuple[int, ...] = ()):
        super().__init__()
        self.model = build_model(load_model_config(TINY_CONFIG), seed=0)
        self.per_module_groups, self.reference, self.updates = per_module_groups, reference, []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        if self.per_module_groups:
            return torch.optim.AdamW(wd.module_param_groups(self, weight_decay=0.1), lr=1e-2)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)  # one group for all

    def on_before_optimizer_step(self, optimizer):
        record = {"update": self.trainer.global_step,
                  "decays": {g["name"]: g["weight_decay"] for g in optimizer.param_groups},
                  **dict(zip(("grad_norm", "weight_norm"), map(float, global_norms(self))))}
        if self.trainer.global_step in self.reference:
            record["pass_on_these_weights"] = alphadecay_pass_decays(self.model)
        self.updates.append(record)


def data(rows: int = 12) -> DataLoader:
    ids = torch.randint(3, 8000, (rows, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2, shuffle=False)


def fit(module: LM, callback=None, *, max_steps: int = 6, ckpt_path=None, save_dir=None, **kwargs) -> pl.Trainer:
    """Lightning on 6 micro-batches per epoch (3 updates); with `save_dir`, a checkpoint every 3 updates: at the end
    of an epoch, where Lightning resumes exactly (mid-epoch it restarts the epoch's data)."""
    saving = [pl.callbacks.ModelCheckpoint(save_dir, every_n_train_steps=3, save_top_k=-1)] if save_dir else []
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=bool(save_dir), enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[c for c in (callback, *saving) if c is not None], **kwargs)
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer


def test_passes_once_per_optimizer_update_on_the_weights_of_that_moment_and_resume_from_a_checkpoint(tmp_path):
    module = LM(reference=(0, 1, 3, 5))
    callback = WeightDecayCallback("alphadecay", every=2)
    trainer = fit(module, callback, save_dir=tmp_path)
    assert [u["update"] for u in module.updates] == list(range(6))  # 12 micro-batches, accumulation 2
    tuned = callback.scheduler.rule.modules
    assert len(tuned) == 13 and tuned[0] == "model.model.layers.0.self_attn.k_proj"  # names under the module
    for u in module.updates:
        if u["update"] in (0, 1, 3, 5):  # update 0 and (update + 1) % 2 == 0, as the plain loop
            expected = {f"model.{m}": d for m, d in u["pass_on_these_weights"].items()}
            assert {m: u["decays"][m] for m in expected} == expected
        else:
            assert u["decays"] == module.updates[u["update"] - 1]["decays"]
    assert trainer.callback_metrics[f"wd/{tuned[0]}"] == pytest.approx(module.updates[5]["decays"][tuned[0]])

    # resume from the checkpoint after update 3: the same decays, at the same passes, as straight through
    resumed = LM()
    resumed_callback = WeightDecayCallback("alphadecay", every=2)
    fit(resumed, resumed_callback, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"))
    assert [u["update"] for u in resumed.updates] == [3, 4, 5] and resumed_callback.scheduler.update == 6
    assert [u["decays"] for u in resumed.updates] == [u["decays"] for u in module.updates[3:]]
    saved = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=False)["callbacks"]["WeightDecayCallback"]
    assert saved["update"] == 3 and saved["method"] == "alphadecay"


def test_gradient_norm_methods_see_the_gradients_before_lightnings_clipping():
    module = LM()
    fit(module, WeightDecayCallback("awd"), max_steps=1, gradient_clip_val=1e-3)
    (update,) = module.updates  # recorded after the callback, before Lightning clips to norm 1e-3
    lambda_t = 100 * 0.1 * update["grad_norm"] / (update["weight_norm"] + 1e-8)  # AWD on the unclipped gradient
    assert update["grad_norm"] > 100 * 1e-3
    decays = list(update["decays"].values())  # every group's: lambda_bar = 0.9 lambda_t after one update
    assert decays == pytest.approx([0.9 * lambda_t] * len(decays), rel=1e-6)


class PlainLoopLM(LM):
    """The plain-loop form the README shows for the Hugging Face / torchrun_main.py order: clip, then the decays."""

    def on_fit_start(self):
        self.wd_scheduler = wd.create("awd", self, self.trainer.optimizers[0])

    def on_before_optimizer_step(self, optimizer):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)
        if metrics := self.wd_scheduler.step():
            self.log_dict(metrics)
        super().on_before_optimizer_step(optimizer)  # records the clipped norm and the decays


def test_the_plain_loop_form_in_a_lightning_module_sees_clipped_gradients():
    module = PlainLoopLM()
    fit(module, max_steps=1)
    (update,) = module.updates
    lambda_t = 100 * 0.1 * update["grad_norm"] / (update["weight_norm"] + 1e-8)
    decays = list(update["decays"].values())
    assert update["grad_norm"] == pytest.approx(1e-3, rel=1e-3)
    assert decays == pytest.approx([0.9 * lambda_t] * len(decays))


def test_one_group_for_all_with_a_module_wise_method_is_an_error_before_training():
    module = LM(per_module_groups=False)
    with pytest.raises(WeightDecayError, match=r"holds 13 tuned modules.*return per-module groups from "
                                               r"configure_optimizers: torch.optim.AdamW\(alphadecay.wd."
                                               r"module_param_groups\(self, weight_decay\)"):
        fit(module, WeightDecayCallback("adadecay"))
    assert module.updates == []
