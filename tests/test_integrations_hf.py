"""alphadecay.integrations.hf in the real Hugging Face Trainer (transformers 5.24 + accelerate, CPU): a tiny GPT-2
from examples/hf_trainer.py on the shipped sample, gradient accumulation 2, every decay read from the optimizer the
Trainer steps."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from alphadecay.integrations.hf import WeightDecayCallback
from alphadecay.wd.registry import WeightDecayError
from tests.conftest import REPO, SAMPLE, TOKENIZER, alphadecay_pass_decays, by_step

sys.path.insert(0, str(REPO / "examples"))
import hf_trainer  # noqa: E402

PASSES = [0, 1, 3, 5]  # every=2 over 6 updates: update 0 and (update + 1) % 2 == 0, as the plain loop (test_examples)


def example_args(output_dir, *extra: str):
    return hf_trainer.parse(["--dataset", SAMPLE, "--tokenizer", TOKENIZER, "--rows", "24", "--batch_size", "2",
                             "--grad_accum", "2", "--max_steps", "6", "--every", "2", "--logging_steps", "1",
                             "--save_steps", "3", "--output_dir", str(output_dir), *extra])


class Probe(TrainerCallback):
    """At every optimizer update: the update, the micro-batches so far, at the updates in `reference` what
    alphadecay.wd's AlphaDecay pass gives on a copy of the weights the step is about to update (a fresh scheduler's
    first step() is a pass on the weights it is given), and the decay of every optimizer group as the step used it
    (read after the step, whatever the callbacks' order: the Trainer re-adds callbacks it restores from a checkpoint
    at the end of its list)."""

    def __init__(self, reference: tuple[int, ...] = ()):
        self.reference, self.micro_batches, self.updates = reference, 0, []

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.micro_batches += 1
        record = {"update": state.global_step, "micro_batches": self.micro_batches}
        if state.global_step in self.reference:
            record["pass_on_these_weights"] = alphadecay_pass_decays(model)
        self.updates.append(record)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.updates[-1]["decays"] = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}


def logged(trainer: Trainer, key: str) -> dict[int, float]:
    return by_step(trainer.state.log_history, key)


def test_passes_run_once_per_optimizer_update_on_the_weights_of_that_moment_and_resume_exactly(tmp_path):
    probe = Probe(reference=tuple(PASSES))
    straight = hf_trainer.build_trainer(example_args(tmp_path / "run"), callbacks=[probe])
    straight.train()
    assert [u["update"] for u in probe.updates] == list(range(6))
    assert [u["micro_batches"] for u in probe.updates] == [2, 4, 6, 8, 10, 12]  # accumulation 2: one call per update
    tuned = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    tuned.remove("transformer.h.0.attn.c_attn")  # GPT-2: every Conv1D but the first; the tied lm_head has no group
    # the passes, and their metrics in the Trainer's log at the update they ran (step = updates completed)
    assert sorted(logged(straight, f"wd/{tuned[0]}")) == [u + 1 for u in PASSES]
    assert sorted(logged(straight, "loss")) == [1, 2, 3, 4, 5, 6]
    for update in probe.updates:
        decays = update["decays"]
        if update["update"] in PASSES:  # AlphaDecay's pass on the weights the step is about to update
            expected = update["pass_on_these_weights"]
            assert {m: decays[m] for m in expected} == expected and set(tuned) < set(expected)
            assert all(logged(straight, f"wd/{m}")[update["update"] + 1] == decays[m] for m in tuned)
        else:  # between passes the decays stay
            assert decays == probe.updates[update["update"] - 1]["decays"]
        assert decays["transformer.h.0.attn.c_attn"] == decays["embeddings"] == decays["norms"] == 0.1
    # update 0 runs at lr 0 (warmup from 0), so the pass at update 1 sees the initial weights again; 3 and 5 move them
    assert len({tuple(u["decays"].values()) for u in probe.updates}) == 3

    # stop after update 3 (the Trainer's checkpoint-3) and resume: the same decays, passes and losses
    resumed_probe = Probe()
    resumed = hf_trainer.build_trainer(example_args(tmp_path / "resumed"), callbacks=[resumed_probe])
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert [u["update"] for u in resumed_probe.updates] == [3, 4, 5]
    assert [u["decays"] for u in resumed_probe.updates] == [u["decays"] for u in probe.updates[3:]]
    assert logged(resumed, "loss") == logged(straight, "loss")
    assert sorted(logged(resumed, f"wd/{tuned[0]}")) == [1, 2, 4, 6]  # the log continues the checkpoint's
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["WeightDecayCallback"]
    assert state["args"] == {"name": "alphadecay", "every": 2} and state["attributes"]["scheduler_state"]["update"] == 3


def test_awd_through_the_optimizer_factory_resumes_its_moving_average_from_the_checkpoint(tmp_path):
    probe = Probe()
    straight = hf_trainer.build_trainer(example_args(tmp_path / "run", "--method", "awd", "--factory"),
                                        callbacks=[probe])
    straight.train()
    assert isinstance(straight.optimizer.optimizer, torch.optim.AdamW)  # accelerate's wrapper around ours
    assert len(straight.optimizer.param_groups) == 10  # 7 Conv1Ds with a group each, embeddings, norms ... by name
    lambda_bar = logged(straight, "awd/lambda_bar")
    assert sorted(lambda_bar) == [1, 2, 3, 4, 5, 6] and len(set(lambda_bar.values())) == 6
    for update in probe.updates:  # AWD: one decay for every group, its moving average (base decay 0.1 x lambda/0.1)
        assert list(update["decays"].values()) == pytest.approx([lambda_bar[update["update"] + 1]] * 10, rel=1e-12)

    # the Trainer rebuilds the callback from trainer_state.json with restore_callback_states_from_checkpoint too
    resumed_probe = Probe()
    resumed = hf_trainer.build_trainer(example_args(tmp_path / "resumed", "--method", "awd", "--factory"),
                                       callbacks=[resumed_probe])
    resumed.args.restore_callback_states_from_checkpoint = True
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert [u["decays"] for u in resumed_probe.updates] == [u["decays"] for u in probe.updates[3:]]
    assert logged(resumed, "awd/lambda_bar") == lambda_bar


def tiny_trainer(tmp_path, callback, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                                       eos_token_id=1))
    rows = [{"input_ids": torch.arange(16) % 64, "labels": torch.arange(16) % 64}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no", weight_decay=0.1)
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback], **kwargs)


def test_the_trainers_own_optimizer_with_a_module_wise_method_is_an_error_that_says_what_to_pass(tmp_path):
    trainer = tiny_trainer(tmp_path, WeightDecayCallback("alphadecay"))  # the Trainer's decay / no-decay groups
    with pytest.raises(WeightDecayError, match=r"holds \d+ tuned modules.*With the Hugging Face Trainer, give it "
                                               r"per-module groups: .*module_groups_optimizer"):
        trainer.train()
    assert trainer.state.global_step == 0  # before any update
    awd = tiny_trainer(tmp_path, WeightDecayCallback("awd"))  # one decay for all: any groups do
    awd.train()
    assert awd.state.global_step == 2 and awd.optimizer.param_groups[1]["weight_decay"] == 0.0  # no-decay stays
    twice = tiny_trainer(tmp_path, WeightDecayCallback("awd"))
    twice.add_callback(WeightDecayCallback("uniform"))
    with pytest.raises(WeightDecayError, match="several WeightDecayCallbacks; give it one"):
        twice.train()
    with pytest.raises(WeightDecayError, match=r"unknown weight-decay method 'alphadecy' \(did you mean 'alphadecay'"):
        WeightDecayCallback("alphadecy")
    with pytest.raises(WeightDecayError, match="'awd' takes no option 'every'"):
        WeightDecayCallback("awd", every=2)
