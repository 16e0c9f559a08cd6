"""Parameter groups: every parameter exactly once, named, decays applied by name."""

import pytest
import torch

from alphadecay.model import build_model, load_model_config
from alphadecay.wd.groups import linear_modules, mean_weight_decay, module_param_groups
from alphadecay.wd.scheduler import Scheduler, WDUpdate
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model():
    return build_model(load_model_config(str(REPO / "configs" / "llama_1m.json")), seed=0)


def test_groups_cover_every_parameter_exactly_once(model):
    groups = module_param_groups(model, 0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_one_group_per_linear_plus_embeddings_and_norms(model):
    groups = module_param_groups(model, 0.1)
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
    groups = module_param_groups(model, 0.1)
    assert {g["weight_decay"] for g in groups} == {0.1}
    groups = module_param_groups(model, 0.1, decay_norms=False, decay_embeddings=False)
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay["norms"] == 0.0 and decay["embeddings"] == 0.0 and decay["lm_head"] == 0.1


class Fixed:
    """A rule that sets given module multipliers once."""

    def __init__(self, multipliers):
        self.modules, self.multipliers = list(multipliers), multipliers

    def step(self, update, model):
        return WDUpdate(self.multipliers) if update == 0 else None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_multipliers_apply_by_name(model):
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
    Scheduler("fixed", Fixed({"model.layers.0.mlp.up_proj": 3.0, "lm_head": 0.5}), model, optimizer).step()
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["model.layers.0.mlp.up_proj"] == pytest.approx(0.3)
    assert decay["lm_head"] == pytest.approx(0.05) and decay["norms"] == 0.1
    # the parameter-weighted mean: only the touched groups move
    sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    expected = sum(sizes[n] * d for n, d in decay.items()) / sum(sizes.values())
    assert mean_weight_decay(optimizer.param_groups) == pytest.approx(expected)


def test_group_decays_survive_optimizer_state_dict(model):
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
    Scheduler("fixed", Fixed({"lm_head": 2.0}), model, optimizer).step()
    state = optimizer.state_dict()
    fresh = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
    fresh.load_state_dict(state)
    head = next(g for g in fresh.param_groups if g["name"] == "lm_head")
    assert head["weight_decay"] == pytest.approx(0.2) and head["wd_multiplier"] == 2.0
