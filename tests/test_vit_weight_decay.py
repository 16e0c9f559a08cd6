"""One weight-decay package for both model families: ViT parameter groups, the ViT's tuned modules and pass timing,
AdaDecay's blocks, AWD's multiplier, and the method registry."""

import numpy as np
import pytest
import torch

from alphadecay import config as config_lib
from alphadecay import esd
from alphadecay.vit.config import parse_vit_args
from alphadecay.vit.model import build_vit
from alphadecay.wd.groups import as_matrix, module_param_groups, weight_modules
from alphadecay.wd.methods.modulewise import ModulewiseDecay, tuned_modules
from alphadecay.wd.registry import METHODS, Method, names
from alphadecay.wd.scheduler import WDUpdate, from_flags

BLOCK_MODULES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return build_vit("vit_deit_tiny_patch16_224", num_classes=1000)


def vit_config(*flags):
    return parse_vit_args(["--data_path", "unused", *flags])[0]


def vit_rule(config, model, updates_per_epoch, weight_decay=1e-4):
    """The rule of the scheduler vit_main.py builds for `config` (the official ViT timing)."""
    optimizer = torch.optim.AdamW(module_param_groups(model, weight_decay), lr=1e-3)
    return from_flags(config, model, optimizer, timing="vit", updates_per_epoch=updates_per_epoch).rule


def test_vit_groups_cover_every_parameter_exactly_once(deit_tiny):
    groups = module_param_groups(deit_tiny, 5e-6)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(deit_tiny.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == 5_717_416  # timm's deit_tiny_patch16_224
    names = [g["name"] for g in groups]
    blocks = [f"blocks.{i}.{m}" for i in range(12) for m in BLOCK_MODULES]
    assert names == ["patch_embed.proj", *blocks, "head", "embeddings", "norms"]
    by_name = {g["name"]: g for g in groups}
    assert [p.shape for p in by_name["patch_embed.proj"]["params"]] == [(192, 3, 16, 16), (192,)]  # weight + bias
    assert [p.shape for p in by_name["blocks.3.attn.qkv"]["params"]] == [(576, 192), (576,)]
    assert {id(p) for p in by_name["embeddings"]["params"]} == {id(deit_tiny.cls_token), id(deit_tiny.pos_embed)}
    assert len(by_name["norms"]["params"]) == 2 * (2 * 12 + 1)  # LayerNorm weight and bias, 2 per block + final
    assert by_name["patch_embed.proj"]["kind"] == "conv" and by_name["head"]["kind"] == "head"
    assert [by_name[f"blocks.7.{m}"]["kind"] for m in BLOCK_MODULES] == ["qkv", "proj", "fc1", "fc2"]
    assert {by_name[f"blocks.{i}.mlp.fc1"]["layer"] for i in range(12)} == set(range(12))
    assert by_name["patch_embed.proj"]["layer"] is None and by_name["head"]["layer"] is None
    assert {g["weight_decay"] for g in groups} == {5e-6}


def test_48_tuned_modules_on_deit_tiny(deit_tiny):
    """Official ViT code: Linear + Conv2d in module order, the patch Conv2d (first) and the head (last) removed."""
    candidates = [n for n, _ in weight_modules(deit_tiny)]
    assert candidates[0] == "patch_embed.proj" and candidates[-1] == "head" and len(candidates) == 50
    tuned = tuned_modules(deit_tiny, remove_first=True, remove_last=True, exclude=[], min_eigs=50)
    assert tuned == [f"blocks.{i}.{m}" for i in range(12) for m in BLOCK_MODULES] and len(tuned) == 48
    for name in ("alphadecay", "adadecay"):
        assert vit_rule(vit_config("--wd_scheduler", name), deit_tiny, 100).modules == tuned


def test_a_conv_spectrum_is_its_out_by_in_k_k_matrix(deit_tiny):
    conv = deit_tiny.patch_embed.proj.weight
    assert as_matrix(conv).shape == (192, 3 * 16 * 16)
    assert torch.equal(as_matrix(conv)[5], conv[5].flatten())
    scheduler = ModulewiseDecay(deit_tiny, metric="alpha", assign="tb_linear_map", every=1, min_ratio=0.5,
                                max_ratio=2.0, remove_first=False, timing="vit", updates_per_epoch=10)
    assert scheduler.modules[0] == "patch_embed.proj" and len(scheduler.modules) == 49
    update = scheduler.step(0, deit_tiny)
    eigs = (torch.linalg.svdvals(as_matrix(conv.detach()).double()) ** 2).sort().values  # 192 = min(out, in*k*k)
    expected, _ = esd.fit_power_law(eigs[None], method="median")
    assert update.metrics["alpha/patch_embed.proj"] == pytest.approx(expected.item(), rel=1e-5)


def test_vit_passes_run_at_the_first_update_of_every_epoch_on_real_gradients():
    """Unlike LLaMA's update-0 placeholder pass, the ViT's first pass sees the first update's gradients, so
    AdaDecay's decays already differ at update 0; --unbalancedWD_every is ignored."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    config = vit_config("--wd_scheduler", "adadecay", "--unbalancedWD_every", "2")
    scheduler = vit_rule(config, model, 5)
    assert [s for s in range(16) if scheduler.due(s)] == [0, 5, 10, 15]
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    update = scheduler.step(0, model)
    multipliers = np.array([update.modules[n] for n in scheduler.modules])
    assert len(multipliers) == 16 and multipliers.std() > 0.1
    assert scheduler.step(1, model) is None


def test_adadecay_blocks_are_the_vit_blocks():
    """layerwise_sigmoid z-scores the gradient norms within each ViT block (4 modules), known answer."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    scheduler = vit_rule(vit_config("--wd_scheduler", "adadecay"), model, 3)
    assert scheduler.blocks == [i for i in range(4) for _ in BLOCK_MODULES]
    modules = dict(weight_modules(model))
    norms = {}
    for i in range(4):
        for j, name in enumerate(BLOCK_MODULES):
            weight = modules[f"blocks.{i}.{name}"].weight
            weight.grad = torch.zeros_like(weight)
            weight.grad.view(-1)[0] = norms[f"blocks.{i}.{name}"] = (j + 1.0) * (i + 1)  # Frobenius norm
    update = scheduler.step(0, model)
    for i in range(4):
        block = np.array([norms[f"blocks.{i}.{m}"] for m in BLOCK_MODULES])
        z = (block - block.mean()) / (block.std() + 1e-8)
        expected = 2 / (1 + np.exp(-4 * z))
        got = [update.modules[f"blocks.{i}.{m}"] for m in BLOCK_MODULES]
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_awd_multiplier_is_the_familys():
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    vit = vit_rule(vit_config("--use_AWD_NeurIPS2023", "--weight_decay", "1e-6"), model, 3, weight_decay=1e-6)
    assert vit.lambda_awd == pytest.approx(50e-6)
    llama = config_lib.parse_args(["--use_AWD_NeurIPS2023", "--weight_decay", "1e-6"])[0]
    optimizer = torch.optim.AdamW(module_param_groups(model, 1e-6), lr=1e-3)
    assert from_flags(llama, model, optimizer).rule.lambda_awd == pytest.approx(100e-6)


def test_choices_come_from_the_registry_and_a_new_method_needs_one_entry(monkeypatch):
    """What the README's "adding a method" paragraph promises: a builder plus one registry line."""
    assert config_lib.WD_SCHEDULERS == tuple(names()) and tuple(METHODS)[:4] == ("uniform", "awd", "adadecay",
                                                                                  "alphadecay")
    module = type(torch)("constant_method")

    class Constant:  # every group's decay x 2, once, at update 0
        modules = []

        def step(self, step, model):
            return WDUpdate(every_group=2.0) if step == 0 else None

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    module.build = lambda model, optimizer, options: Constant()
    monkeypatch.setitem(__import__("sys").modules, "constant_method", module)
    monkeypatch.setitem(METHODS, "constant", Method("constant_method:build", "decay x 2"))
    config = vit_config()
    config.wd_scheduler = "constant"
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    optimizer = torch.optim.AdamW(module_param_groups(model, 1e-4), lr=1e-3)
    scheduler = from_flags(config, model, optimizer, timing="vit", updates_per_epoch=3)
    assert scheduler.step() == {} and scheduler.step() is None
    assert {g["weight_decay"] for g in optimizer.param_groups} == {2e-4}
