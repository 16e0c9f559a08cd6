"""Layerwise scaling rules (alphadecay/scaling.py) and their diagnostic (alphadecay/diagnostics.py)."""

import math

import pytest
import torch

from alphadecay.checkpoint import load_checkpoint
from alphadecay.config import parse_args
from alphadecay.diagnostics import sublayer_gains, top_singular_values
from alphadecay.errors import UserError
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.wd.groups import module_param_groups
from alphadecay.wd.scheduler import Scheduler, WDUpdate
from alphadecay.scaling import apply_scaling_rule, parameter_class
from tests.conftest import TINY_CONFIG, read_metrics, run_main, train_args

BASE, WD = 64, 0.1
MATRIX = {"q", "k", "v", "o", "gate", "up", "down"}


@pytest.fixture(scope="module")
def model():
    return build_model(load_model_config(TINY_CONFIG), seed=0)


def groups_of(model, **rule):
    groups = module_param_groups(model, WD)
    return apply_scaling_rule(groups, **rule) if rule else groups


def test_classification_by_role_and_head_choice(model):
    classes = {g["kind"]: parameter_class(g) for g in groups_of(model)}
    assert {k for k, c in classes.items() if c == "matrix"} == MATRIX | {"head"}
    assert classes["embedding"] == classes["norm"] == "vector"
    head = next(g for g in groups_of(model) if g["kind"] == "head")
    assert parameter_class(head, head="vector") == "vector"


@pytest.mark.parametrize("width", [64, 128, 256, 1024])
@pytest.mark.parametrize("head", ["matrix", "vector"])
def test_fan2025_follows_the_rule(model, width, head):
    for g in groups_of(model, rule="fan2025", width=width, base_width=BASE, head=head):
        if g["kind"] in MATRIX or (g["kind"] == "head" and head == "matrix"):
            assert g["lr_scale"] == pytest.approx(BASE / width, rel=1e-12)
            assert g["weight_decay"] == g["base_weight_decay"] == pytest.approx(WD * math.sqrt(width / BASE), rel=1e-12)
        else:
            assert (g["lr_scale"], g["weight_decay"], g["base_weight_decay"]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("width", [64, 256, 1024])
def test_mup_lr_scales_only_the_matrix_learning_rates(model, width):
    for g in groups_of(model, rule="mup_lr", width=width, base_width=BASE):
        matrix = g["kind"] in MATRIX | {"head"}
        assert g["lr_scale"] == pytest.approx(BASE / width if matrix else 1.0, rel=1e-12)
        assert g["weight_decay"] == WD


def test_none_changes_nothing(model):
    def plain(groups):
        return [{k: v for k, v in g.items() if k != "params"} for g in groups]

    assert plain(groups_of(model, rule="none", width=1024, base_width=None)) == plain(groups_of(model))


def test_a_module_wise_multiplier_composes_with_the_rule(model):
    groups = groups_of(model, rule="fan2025", width=256, base_width=BASE)
    optimizer = build_optimizer(groups, parse_args(train_args(None))[0], torch.device("cpu"))

    class Fixed:  # a module-wise pass, then one multiplier for every group (as AWD)
        modules = ["model.layers.1.mlp.up_proj", "lm_head"]

        def step(self, update, model):
            return WDUpdate({"model.layers.1.mlp.up_proj": 3.0, "lm_head": 0.5}) if update == 0 else \
                WDUpdate(every_group=1.5)

    scheduler = Scheduler("fixed", Fixed(), model, optimizer)
    scheduler.step()
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["model.layers.1.mlp.up_proj"] == pytest.approx(3.0 * WD * 2.0)
    assert decay["lm_head"] == pytest.approx(0.5 * WD * 2.0)
    assert decay["model.layers.0.self_attn.q_proj"] == pytest.approx(WD * 2.0)
    assert decay["norms"] == 0.0  # vector-like groups stay undecayed whatever the scheduler says
    scheduler.step()
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["model.layers.1.mlp.up_proj"] == pytest.approx(1.5 * WD * 2.0) and decay["norms"] == 0.0


def test_top_singular_value_is_exact():
    model = build_model(load_model_config(TINY_CONFIG), seed=1)
    with torch.no_grad():  # trained-like spectra: a few outlying directions on top of the random bulk
        for i, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            out_dim, in_dim = module.weight.shape
            module.weight += 0.1 * (i % 3) * torch.randn(out_dim, 2) @ torch.randn(2, in_dim) / math.sqrt(in_dim)
    sigma = top_singular_values(model)
    assert len(sigma) == 15 and "lm_head" in sigma
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            exact = torch.linalg.svdvals(module.weight.detach().double())[0].item()
            assert sigma[name] == pytest.approx(exact, rel=1e-5)


def manual_gains(model, input_ids, mask):
    """Each sublayer's output and input RMS from a hand-written forward pass, checked against the model's logits."""
    def rms(x):
        return x[mask].double().pow(2).mean().sqrt()

    inner = model.model
    x = inner.embed_tokens(input_ids)
    rope = inner.rotary_emb(x, torch.arange(input_ids.shape[1])[None])
    gains = {}
    for i, layer in enumerate(inner.layers):
        attn_in = layer.input_layernorm(x)
        attn_out = layer.self_attn(hidden_states=attn_in, position_embeddings=rope, attention_mask=None)[0]
        x = x + attn_out
        mlp_in = layer.post_attention_layernorm(x)
        mlp_out = layer.mlp(mlp_in)
        x = x + mlp_out
        gains[f"attn/{i}"], gains[f"mlp/{i}"] = float(rms(attn_out) / rms(attn_in)), float(rms(mlp_out) / rms(mlp_in))
    torch.testing.assert_close(model.lm_head(inner.norm(x)), model(input_ids=input_ids).logits)
    return gains


@torch.no_grad()
def test_sublayer_gain_matches_a_manual_forward_pass(model):
    input_ids = torch.randint(0, 8000, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask[1, 10:] = mask[2, 5:] = False  # right padding is left out of the RMS
    gains = sublayer_gains(model, input_ids, mask)
    expected = manual_gains(model, input_ids, mask)
    assert set(gains) == {"attn/0", "attn/1", "mlp/0", "mlp/1"}
    for key, value in expected.items():
        assert gains[key] == pytest.approx(value, rel=1e-5)
    assert model.training and not any(m._forward_hooks for m in model.modules())  # left as it was found


def test_training_with_the_rule_logs_the_diagnostic(tmp_path):
    assert run_main(train_args(tmp_path, scaling_rule="fan2025", base_width=32, diagnostics_every=2,
                               num_training_steps=4, eval_every=4, save_every=4)) == 0
    probes = [m for m in read_metrics(tmp_path) if "gain_mean/attn" in m]
    assert [m["step"] for m in probes] == [2, 4]
    assert {"sigma_max/lm_head", "sigma_max/model.layers.1.mlp.down_proj", "sigma_max_mean/q", "sigma_max_mean/head",
            "gain/attn/0", "gain/mlp/1", "gain_mean/mlp"} <= set(probes[-1])
    assert all(v > 0 and math.isfinite(v) for k, v in probes[-1].items() if k != "step")
    groups = {g["name"]: g for g in load_checkpoint(str(tmp_path / "model_4"))[1]["optimizer"]["param_groups"]}
    assert groups["model.layers.0.mlp.up_proj"]["lr_scale"] == pytest.approx(0.5)  # hidden 64, base 32
    assert groups["model.layers.0.mlp.up_proj"]["weight_decay"] == pytest.approx(0.1 * math.sqrt(2))
    assert groups["embeddings"]["weight_decay"] == groups["norms"]["weight_decay"] == 0.0


@pytest.mark.parametrize("flags, flag", [
    ({"scaling_rule": "fan2025"}, "--base_width"),
    ({"scaling_rule": "mup_lr"}, "--base_width"),
    ({"base_width": 64}, "--base_width"),
    ({"scaling_rule": "fan2025", "base_width": 0}, "--base_width"),
    ({"scaling_rule": "fan2025", "base_width": 64, "optimizer": "adam"}, "--optimizer adamw"),
    ({"diagnostics_every": -1}, "--diagnostics_every"),
    ({"scaling_rule": "mup"}, "--scaling_rule"),
    ({"scaling_head": "row"}, "--scaling_head"),
])
def test_bad_flag_combinations_are_user_errors(flags, flag):
    with pytest.raises(UserError, match=flag):
        parse_args(train_args(None, **flags))


def test_the_rule_flags_parse():
    config = parse_args(train_args(None, scaling_rule="mup_lr", base_width=64, optimizer="adam",
                                   scaling_head="vector", diagnostics_every=5))[0]
    assert (config.scaling_rule, config.base_width, config.scaling_head, config.diagnostics_every) == \
        ("mup_lr", 64, "vector", 5)
