"""Parameter groups: every parameter exactly once, named, decays applied by name."""

import pytest
import torch

from alphadecay.model import build_model, load_model_config
from alphadecay.wd.groups import apply_multipliers, build_param_groups, linear_modules, mean_weight_decay
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model():
    return build_model(load_model_config(str(REPO / "configs" / "llama_1m.json")), seed=0)


def test_groups_cover_every_parameter_exactly_once(model):
    groups = build_param_groups(model, weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_one_group_per_linear_plus_embeddings_and_norms(model):
    groups = build_param_groups(model, weight_decay=0.1)
    names = [g["name"] for g in groups]
    linears = [n for n, _ in linear_modules(model)]
    assert names == linears + ["embeddings", "norms"]
    assert linears[0] == "model.layers.0.self_attn.q_proj" and linears[-1] == "lm_head"
    kinds = {g["name"]: g["kind"] for g in groups}
    assert kinds["model.layers.1.mlp.down_proj"] == "down" and kinds["lm_head"] == "head"
    assert {g["layer"] for g in groups if g["kind"] in "q k v o gate up down".split()} == {0, 1}
    norms = next(g for g in groups if g["name"] == "norms")
    assert len(norms["params"]) == 2 * 2 + 1  # two per block plus the final norm


def test_uniform_decay_everywhere_by_default_and_switches(model):
    groups = build_param_groups(model, weight_decay=0.1)
    assert {g["weight_decay"] for g in groups} == {0.1}
    groups = build_param_groups(model, weight_decay=0.1, decay_norms=False, decay_embeddings=False)
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay["norms"] == 0.0 and decay["embeddings"] == 0.0 and decay["lm_head"] == 0.1


def test_multipliers_apply_by_name(model):
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), lr=1e-3)
    apply_multipliers(optimizer, {"model.layers.0.mlp.up_proj": 3.0, "norms": 0.5})
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["model.layers.0.mlp.up_proj"] == pytest.approx(0.3)
    assert decay["norms"] == pytest.approx(0.05) and decay["lm_head"] == 0.1
    with pytest.raises(KeyError, match="no parameter group named"):
        apply_multipliers(optimizer, {"model.layers.9.mlp.up_proj": 1.0})
    # the parameter-weighted mean: only the touched groups move
    sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    expected = sum(sizes[n] * d for n, d in decay.items()) / sum(sizes.values())
    assert mean_weight_decay(optimizer.param_groups) == pytest.approx(expected)


def test_group_decays_survive_optimizer_state_dict(model):
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), lr=1e-3)
    apply_multipliers(optimizer, {"lm_head": 2.0})
    state = optimizer.state_dict()
    fresh = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), lr=1e-3)
    fresh.load_state_dict(state)
    head = next(g for g in fresh.param_groups if g["name"] == "lm_head")
    assert head["weight_decay"] == pytest.approx(0.2) and head["wd_multiplier"] == 2.0
