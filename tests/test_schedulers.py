"""The weight-decay schedulers: AWD's moving average, the module-wise passes, rank agreement, resume, the CLI."""

import math
import shutil

import numpy as np
import pytest
import torch

from alphadecay.config import parse_args
from alphadecay.errors import UserError
from alphadecay.model import build_model, load_model_config
from alphadecay import wd
from alphadecay.wd.groups import module_param_groups
from alphadecay.wd.methods.awd import AWD
from alphadecay.wd.methods.modulewise import ModulewiseDecay, tuned_modules
from alphadecay.wd.scheduler import from_flags
from tests.conftest import TINY_CONFIG, by_step, read_metrics, run_main, train_args

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def tiny():
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    return model, module_param_groups(model, 0.1)


def modulewise(model, **overrides):
    """The module-wise rule alone (no optimizer): its passes, scores and multipliers."""
    kwargs = dict(metric="alpha", assign="tb_linear_map", every=5, min_ratio=0.6666, max_ratio=5.0)
    kwargs.update(overrides)
    return ModulewiseDecay(model, **kwargs)


# -- AWD -----------------------------------------------------------------------------------------------------------
def test_awd_moving_average_known_answer():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    awd = AWD(weight_decay=1e-3, multiplier=100.0)  # lambda_awd = 0.1
    expected_bar = 0.0
    for grad_norm in (1.0, 2.0, 0.5):
        model.weight.grad = torch.tensor([[grad_norm, 0.0], [0.0, 0.0]])
        update = awd.step(0, model)
        lambda_t = 0.1 * grad_norm / (5.0 + 1e-8)
        expected_bar = 0.1 * expected_bar + 0.9 * lambda_t
        assert update.metrics["awd/lambda_t"] == pytest.approx(lambda_t)
        assert update.metrics["awd/lambda_bar"] == pytest.approx(expected_bar)
        assert update.every_group == pytest.approx(expected_bar / 1e-3) and update.modules == {}
    restored = AWD(weight_decay=1e-3)
    restored.load_state_dict(awd.state_dict())
    assert restored.lambda_bar == awd.lambda_bar


# -- module-wise: which modules, when ------------------------------------------------------------------------------
def test_tuned_modules_follow_the_official_exclusions():
    model, _ = tiny()
    all_linears = tuned_modules(model, remove_first=False, remove_last=False, exclude=[])
    assert len(all_linears) == 7 * 2 + 1
    default = tuned_modules(model, remove_first=True, remove_last=True, exclude=[])
    assert default == all_linears[1:-1] and all_linears[0] == "model.layers.0.self_attn.q_proj"
    assert all("self_attn" in n for n in tuned_modules(model, remove_first=True, remove_last=True, exclude=["mlp"]))
    assert tuned_modules(model, remove_first=False, remove_last=False, exclude=[], min_eigs=65) == []


def test_passes_run_at_update_zero_and_every_k():
    model, groups = tiny()
    scheduler = wd.create("alphadecay", model, torch.optim.AdamW(groups, lr=1e-3), every=5)
    assert [s for s in range(16) if scheduler.step() is not None] == [0, 4, 9, 14]
    assert scheduler.update == 16


# -- AlphaDecay --------------------------------------------------------------------------------------------------
def test_alphadecay_at_init_gives_attention_less_decay_than_mlp():
    """At random init square matrices have alpha ~2.1 and 0.36-aspect MLP matrices ~3.0 (official-code.md §3.6)."""
    model, groups = tiny()
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = wd.create("alphadecay", model, optimizer, every=5, max_ratio=5.0)
    metrics = scheduler.step()
    scheduler = scheduler.rule
    alpha = {n: metrics[f"alpha/{n}"] for n in scheduler.modules}
    kinds = dict(zip(scheduler.modules, scheduler.kinds))
    attn = [alpha[n] for n in alpha if kinds[n] in ATTENTION]
    mlp = [alpha[n] for n in alpha if kinds[n] in MLP]
    assert max(attn) < min(mlp)
    assert 1.8 < np.mean(attn) < 2.5 and 2.6 < np.mean(mlp) < 3.4
    multipliers = scheduler.last_multipliers
    assert min(multipliers.values()) == pytest.approx(0.6666) and max(multipliers.values()) == pytest.approx(5.0)
    assert max(multipliers[n] for n in alpha if kinds[n] in ATTENTION) < min(multipliers[n] for n in alpha if kinds[n] in MLP)
    # logged decays and summaries
    assert metrics[f"wd/{scheduler.modules[0]}"] == pytest.approx(0.1 * multipliers[scheduler.modules[0]])
    assert {"alpha_Q", "alpha_MLPdown", "wd_Q", "wd_multiplier_mean"} <= set(metrics)
    assert metrics["alpha_K"] == pytest.approx(np.mean([alpha[n] for n in alpha if kinds[n] == "k"]))
    assert metrics["wd_K"] == pytest.approx(np.mean([0.1 * multipliers[n] for n in alpha if kinds[n] == "k"]))


def test_unit_ratios_reduce_alphadecay_to_uniform():
    model, groups = tiny()
    update = modulewise(model, min_ratio=1.0, max_ratio=1.0).step(0, model)
    assert set(update.modules.values()) == {1.0}


def test_without_alpha_positively_the_pass_only_measures():
    model, groups = tiny()
    update = modulewise(model, apply_mapping=False).step(0, model)
    assert set(update.modules.values()) == {1.0}
    assert all(math.isfinite(update.metrics[f"alpha/{n}"]) for n in update.modules)


# -- AdaDecay ----------------------------------------------------------------------------------------------------
def test_adadecay_starts_uniform_then_zscores_gradient_norms_per_block():
    model, groups = tiny()
    scheduler = modulewise(model, metric="gradnorm", assign="layerwise_sigmoid")
    assert not scheduler.needs_eigs
    assert set(scheduler.step(0, model).modules.values()) == {1.0}  # the official placeholder norms
    ids = torch.randint(3, 8000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    update = scheduler.step(4, model)
    modules = dict(model.named_modules())
    for block in (0, 1):
        names = [n for n, b in zip(scheduler.modules, scheduler.blocks) if b == block]
        norms = np.array([modules[n].weight.grad.norm().item() for n in names])
        z = (norms - norms.mean()) / (norms.std() + 1e-8)
        np.testing.assert_allclose([update.modules[n] for n in names], 2 / (1 + np.exp(-4 * z)), rtol=1e-6)
        assert update.metrics[f"gradnorm/{names[0]}"] == pytest.approx(norms[0], rel=1e-6)
    assert len([b for b in scheduler.blocks if b == 0]) == 6  # layer-0 q_proj is not tuned


def test_official_adadecay_init_trains_tuned_modules_without_decay_until_the_first_pass():
    """The official integer placeholder 10 makes layerwise_sigmoid's decays int64 zeros at initialisation."""
    model, groups = tiny()
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = wd.create("adadecay", model, optimizer, every=5, official_adadecay_init=True)
    metrics = scheduler.step()
    tuned = scheduler.rule.modules
    assert set(scheduler.rule.last_multipliers.values()) == {0.0} and len(tuned) == 13
    assert metrics[f"wd/{tuned[0]}"] == 0.0 and scheduler.last_weight_decays()[tuned[0]] == 0.0
    for _ in range(3):
        assert scheduler.step() is None  # the zero decays stay until the first in-loop pass
    ids = torch.randint(3, 8000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    scheduler.step()
    later = scheduler.rule.last_multipliers
    assert all(0 < m < 2 for m in later.values()) and len(set(later.values())) > 2  # the z-scored map from then on
    config, _ = parse_args(["--wd_scheduler", "adadecay", "--official_adadecay_init", "--model_config", TINY_CONFIG])
    assert from_flags(config, model, torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)).rule.zero_at_init


def test_official_adadecay_init_is_refused_for_other_methods():
    with pytest.raises(UserError, match="--official_adadecay_init only changes AdaDecay"):
        parse_args(["--wd_scheduler", "alphadecay", "--official_adadecay_init"])


def test_multipliers_compose_with_group_base_decays():
    model, groups = tiny()
    assert groups[5]["name"] == "model.layers.0.mlp.up_proj"
    groups[5]["base_weight_decay"] = groups[5]["weight_decay"] = 0.3  # as a scaling rule sets it
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = wd.create("alphadecay", model, optimizer, max_ratio=5.0)
    scheduler.step()
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    for name, multiplier in scheduler.rule.last_multipliers.items():
        base = 0.3 if name == "model.layers.0.mlp.up_proj" else 0.1
        assert decay[name] == pytest.approx(base * multiplier)
    assert scheduler.last_weight_decays() == {n: d for n, d in decay.items() if n not in ("embeddings", "norms")}
    assert decay["lm_head"] == decay["embeddings"] == 0.1 and decay["model.layers.0.self_attn.q_proj"] == 0.1


@pytest.mark.parametrize("method", ["uniform", "awd", "adadecay", "alphadecay"])
def test_factory_builds_each_method(method):
    model, groups = tiny()
    config, _ = parse_args(["--wd_scheduler", method, "--weight_decay", "0.1", "--model_config", TINY_CONFIG])
    scheduler = from_flags(config, model, torch.optim.AdamW(groups, lr=1e-3)).rule
    assert type(scheduler).__name__ == {"uniform": "Uniform", "awd": "AWD"}.get(method, "ModulewiseDecay")
    if method == "adadecay":
        assert scheduler.metric == "gradnorm" and scheduler.assign_func == "layerwise_sigmoid"


# -- through the command line ----------------------------------------------------------------------------------------
METHOD_FLAGS = {  # the official scripts' flags for each method (the paper's command lines)
    "alphadecay": "--use_modulewise_wd --alpha_positively_with_WD --unbalancedWD_every 3 --esd_metric_for_tb alpha "
                  "--assign_func tb_linear_map --wd_min_ratio 0.6666 --wd_max_ratio 5",
    "adadecay": "--use_modulewise_wd --alpha_positively_with_WD --unbalancedWD_every 3 --esd_metric_for_tb gradnorm "
                "--assign_func layerwise_sigmoid",
    "awd": "--use_AWD_NeurIPS2023",
}


def method_args(save_dir, method, optimizer="adam", **overrides):
    args = train_args(save_dir, optimizer=optimizer, weight_decay=1e-2 if optimizer == "adam" else 0.1, **overrides)
    return args + METHOD_FLAGS[method].split()


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_each_method_trains_from_its_script_flags_and_logs_its_decays(tmp_path, method):
    assert run_main(method_args(tmp_path, method)) == 0
    metrics = read_metrics(tmp_path)
    losses = by_step(metrics, "loss")
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    if method == "awd":
        bars = by_step(metrics, "awd/lambda_bar")
        assert sorted(bars) == list(range(1, 9))
        assert by_step(metrics, "weight_decay")[8] == pytest.approx(bars[8])
        return
    key = "alpha" if method == "alphadecay" else "gradnorm"
    passes = sorted(by_step(metrics, f"{key}/model.layers.1.mlp.up_proj"))
    assert passes == [1, 3, 6]  # update 0, then (update + 1) % 3 == 0 -> updates 2 and 5 (logged as steps 3, 6)
    record = next(m for m in metrics if m["step"] == 6 and "wd/model.layers.1.mlp.up_proj" in m)
    assert len([k for k in record if k.startswith("wd/")]) == 13
    assert "wd_multiplier_mean" in record


@pytest.mark.parametrize("method", ["alphadecay", "awd"])
def test_scheduler_state_survives_resume(tmp_path, method):
    assert run_main(method_args(tmp_path / "straight", method, optimizer="adamw")) == 0
    shutil.copytree(tmp_path / "straight" / "model_4", tmp_path / "resumed" / "model_4")
    assert run_main(method_args(tmp_path / "resumed", method, optimizer="adamw",
                                continue_from=tmp_path / "resumed" / "model_4")) == 0
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    key = "awd/lambda_bar" if method == "awd" else "wd/model.layers.1.mlp.up_proj"
    for k in ("loss", key):
        assert by_step(resumed, k) == {s: v for s, v in by_step(straight, k).items() if s > 4}, k


def test_alphadecay_with_unit_ratios_trains_exactly_like_uniform(tmp_path):
    uniform = train_args(tmp_path / "uniform", num_training_steps=5, save_every=100, eval_every=100)
    alpha = train_args(tmp_path / "alpha", num_training_steps=5, save_every=100, eval_every=100,
                       wd_scheduler="alphadecay", wd_min_ratio=1, wd_max_ratio=1, unbalancedWD_every=2)
    assert run_main(uniform) == 0 and run_main(alpha) == 0
    assert by_step(read_metrics(tmp_path / "uniform"), "loss") == by_step(read_metrics(tmp_path / "alpha"), "loss")
