"""alphadecay.wd as a library: groups on any Hugging Face causal LM, the scheduler's counting, name-based binding,
wrappers, resume, and the errors a user meets."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import alphadecay.wd as wd
from alphadecay.model import build_model, load_model_config
from alphadecay.wd.groups import module_matrix, weight_modules
from alphadecay.wd.registry import METHODS, OPTIONS, WeightDecayError
from tests.conftest import TINY_CONFIG, free_port

SMALL = dict(vocab_size=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def tiny_hf(kind: str) -> nn.Module:
    """Tiny random causal LMs of four families, built from configs (no hub)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, **SMALL))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, **SMALL))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **SMALL))
    if kind == "neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, **SMALL))
    raise ValueError(kind)


def backward(model: nn.Module, seed: int = 0) -> None:
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()


# -- groups on any Hugging Face model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral", "neox"])
def test_groups_cover_every_parameter_of_any_causal_lm_exactly_once(kind):
    model = tiny_hf(kind)
    groups = wd.module_param_groups(model, 0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert all(g["params"] for g in groups)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)) and {"embeddings", "norms"} <= set(names) and "other" not in names
    modules = dict(weight_modules(model))
    for g in groups[:-2]:  # one group per weight module, holding its weight (and bias)
        assert g["params"][0] is modules[g["name"]].weight
    scheduler = wd.create("alphadecay", model, torch.optim.AdamW(groups, lr=1e-3), every=2)
    metrics = scheduler.step()
    tuned = scheduler.rule.modules
    assert tuned and all(f"wd/{n}" in metrics and metrics[f"alpha/{n}"] > 1 for n in tuned)


def test_gpt2_conv1d_is_a_transposed_linear_and_its_tied_head_is_not_tuned():
    model = tiny_hf("gpt2")
    conv1d = [n for n, m in weight_modules(model) if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and [n for n, _ in weight_modules(model)][-1] == "lm_head"
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.shape == (64, 256) and module_matrix(c_fc).shape == (256, 64)  # (out, in)
    x = torch.randn(3, 64)
    torch.testing.assert_close(c_fc(x), x @ module_matrix(c_fc).T + c_fc.bias)
    groups = wd.module_param_groups(model, 0.1)
    names = [g["name"] for g in groups]
    assert "lm_head" not in names and names[:8] == conv1d  # the tied head is the embedding, grouped there once
    embeddings = next(g for g in groups if g["name"] == "embeddings")
    assert any(p is model.lm_head.weight for p in embeddings["params"]) and len(embeddings["params"]) == 2
    assert next(g for g in groups if g["name"] == "norms")["params"][0] is model.transformer.h[0].ln_1.weight
    for name in ("alphadecay", "adadecay"):
        scheduler = wd.create(name, model, torch.optim.AdamW(groups, lr=1e-3))
        assert scheduler.rule.modules == conv1d[1:]  # every Conv1D but the first; lm_head is last, and tied


# -- create, available, options --------------------------------------------------------------------------------------
def test_available_lists_every_registered_method_with_a_line():
    methods = wd.available()
    assert list(methods) == list(METHODS) and {"uniform", "awd", "adadecay", "alphadecay"} <= set(methods)
    assert all(isinstance(v, str) and v and "\n" not in v for v in methods.values())
    paper = {"every": 500, "min_ratio": 0.6666, "max_ratio": 3.0, "metric": "alpha", "fit": "median",
             "estimator": "full", "assign": "tb_linear_map", "awd_multiplier": 100.0}
    assert {k: OPTIONS[k].default for k in paper} == paper
    assert OPTIONS["every"].flag == "unbalancedWD_every" and OPTIONS["assign"].flag == "assign_func"


def test_unknown_methods_options_and_values_are_errors_that_list_the_valid_ones():
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    optimizer = torch.optim.AdamW(wd.module_param_groups(model, 0.1), lr=1e-3)
    with pytest.raises(WeightDecayError, match=r"unknown weight-decay method 'alphadecy' \(did you mean 'alphadecay'"
                                               r"\?\); the registered ones are: uniform, awd"):
        wd.create("alphadecy", model, optimizer)
    with pytest.raises(WeightDecayError, match=r"takes no option 'evry' \(did you mean 'every'\?\); its options are: "
                                               r"every, timing"):
        wd.create("alphadecay", model, optimizer, evry=3)
    with pytest.raises(WeightDecayError, match="'uniform' takes no option 'every'.*its options are: none"):
        wd.create("uniform", model, optimizer, every=3)
    with pytest.raises(WeightDecayError, match="option fit='mle' is not one of median, fix-finger, goodness-of-fit"):
        wd.create("alphadecay", model, optimizer, fit="mle")
    with pytest.raises(WeightDecayError, match="updates_per_epoch"):
        wd.create("alphadecay", model, optimizer, timing="vit")
    with pytest.raises(ValueError):  # a WeightDecayError is a ValueError to code that catches those
        wd.create("alphadecay", model, optimizer, every=0)


def test_a_model_without_weight_modules_is_an_error_that_says_what_to_pass():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(WeightDecayError, match="has no nn.Linear, nn.Conv2d or Hugging Face Conv1D module"):
        wd.create("alphadecay", model, torch.optim.AdamW(model.parameters(), lr=1e-3))


# -- binding by name, param_names or identity ------------------------------------------------------------------------
def per_module_groups(model, *, key: str):
    """One group per weight module plus the rest, addressed by `key`: 'param_names' (torch's named groups) or
    'identity' (bare parameter lists)."""
    groups, owned = [], set()
    for name, module in weight_modules(model):
        named = list(module.named_parameters(prefix=name, recurse=False))
        owned |= {id(p) for _, p in named}
        group = {"params": [p for _, p in named], "weight_decay": 0.1}
        if key == "param_names":
            group["param_names"] = [n for n, _ in named]
        groups.append(group)
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in owned]
    groups.append({"params": [p for _, p in rest], "weight_decay": 0.0})
    if key == "param_names":  # torch wants names on every group or none
        groups[-1]["param_names"] = [n for n, _ in rest]
    return groups


@pytest.mark.parametrize("key", ["param_names", "identity"])
def test_decays_reach_groups_without_names_by_param_names_or_identity(key):
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    reference = torch.optim.AdamW(wd.module_param_groups(model, 0.1), lr=1e-3)
    expected = wd.create("alphadecay", model, reference)
    expected.step()
    optimizer = torch.optim.AdamW(per_module_groups(model, key=key), lr=1e-3)
    optimizer.param_groups.reverse()  # positions mean nothing
    scheduler = wd.create("alphadecay", model, optimizer)
    scheduler.step()
    assert scheduler.last_weight_decays() == expected.last_weight_decays()
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # the rest keeps its own


def test_groups_that_mix_or_split_tuned_modules_are_errors_that_point_to_module_param_groups():
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    hf_style = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    with pytest.raises(WeightDecayError, match=r"holds \d+ tuned modules .* build the groups with "
                                               r"alphadecay.wd.module_param_groups"):
        wd.create("alphadecay", model, hf_style)
    wd.create("uniform", model, hf_style)  # one decay for all: any groups do
    wd.create("awd", model, hf_style)
    gpt2 = tiny_hf("gpt2")
    groups = wd.module_param_groups(gpt2, 0.1)
    c_fc = next(g for g in groups if g["name"] == "transformer.h.1.mlp.c_fc")
    bias = c_fc["params"].pop()  # the module's bias in a group of its own: the module is split
    groups.append({"params": [bias], "weight_decay": 0.0})
    with pytest.raises(WeightDecayError, match=r"'transformer.h.1.mlp.c_fc' is in optimizer groups \[6, 10\]"):
        wd.create("adadecay", gpt2, torch.optim.AdamW(groups, lr=1e-3))


def test_a_gradient_norm_method_without_gradients_says_where_step_belongs():
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    adadecay = wd.create("adadecay", model, torch.optim.AdamW(wd.module_param_groups(model, 0.1)), every=2)
    adadecay.step()  # update 0: the official placeholder pass needs no gradient
    with pytest.raises(WeightDecayError, match=r"call the scheduler's step\(\) after loss.backward\(\)"):
        adadecay.step()  # update 1 is a pass
    awd = wd.create("awd", model, torch.optim.AdamW(wd.module_param_groups(model, 0.1)))
    with pytest.raises(WeightDecayError, match="no parameter has a gradient"):
        awd.step()


def test_wrappers_are_transparent():
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    compiled = torch.compile(model)  # an OptimizedModule around the model (nothing compiles until it runs)
    optimizer = torch.optim.AdamW(wd.module_param_groups(compiled, 0.1), lr=1e-3)
    assert [g["name"] for g in optimizer.param_groups][:2] == ["_orig_mod.model.layers.0.self_attn.q_proj",
                                                               "_orig_mod.model.layers.0.self_attn.k_proj"]
    scheduler = wd.create("alphadecay", compiled, optimizer)
    assert scheduler.model is model and len(scheduler.rule.modules) == 13
    scheduler.step()
    assert "model.layers.1.mlp.up_proj" in scheduler.last_weight_decays()


# -- counting and resume ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adadecay", "alphadecay", "awd"])
def test_stop_after_update_3_and_resume_from_the_state_dicts_is_exact(name):
    def run(updates, resume_from=None):
        model = build_model(load_model_config(TINY_CONFIG), seed=0)
        optimizer = torch.optim.AdamW(wd.module_param_groups(model, 0.1), lr=1e-2)
        options = {} if name == "awd" else {"every": 2}
        scheduler = wd.create(name, model, optimizer, **options)
        if resume_from is not None:
            model.load_state_dict(resume_from["model"])
            optimizer.load_state_dict(resume_from["optimizer"])
            scheduler.load_state_dict(resume_from["scheduler"])
        losses, decays = [], []
        for update in range(scheduler.update, updates):
            ids = torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(update))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            scheduler.step()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            decays.append(scheduler.last_weight_decays())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict()}
        return losses, decays, state

    straight_losses, straight_decays, _ = run(6)
    *_, state = run(3)
    assert state["scheduler"]["update"] == 3 and state["scheduler"]["method"] == name
    resumed_losses, resumed_decays, _ = run(6, resume_from=state)
    assert resumed_losses == straight_losses[3:] and resumed_decays == straight_decays[3:]
    assert len({tuple(d.values()) for d in straight_decays}) > 1  # the decays did change along the way


# -- 2 gloo processes through the library ----------------------------------------------------------------------------
def _ranks_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_hf("gpt2")
    ddp = nn.parallel.DistributedDataParallel(model)
    result = {}
    for name in ("alphadecay", "adadecay"):
        optimizer = torch.optim.AdamW(wd.module_param_groups(ddp, 0.1), lr=1e-3)
        scheduler = wd.create(name, ddp, optimizer, timing="vit", updates_per_epoch=1)  # a pass every update
        backward(ddp, seed=rank)  # different data per rank; DDP averages the gradients
        if rank == 1:  # a replica that drifted: the decays must still agree
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        scheduler.step()
        result[name] = scheduler.last_weight_decays()
        optimizer.zero_grad()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    del ddp, scheduler, optimizer  # DDP's reducer before its process group: freed later, gloo's teardown can deadlock
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def test_two_processes_apply_identical_decays_through_the_library(tmp_path):
    mp.spawn(_ranks_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first == second
    for decays in first.values():
        assert len(decays) == 8 and len(set(decays.values())) > 2  # 7 tuned Conv1Ds + the untuned first one
