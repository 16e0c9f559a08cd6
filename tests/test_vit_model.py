"""alphadecay.vit.model: timm's DeiT-tiny state_dict (key list fixture), the forward pass against an independent
ViT (transformers'), initialisation, drop path, the registry and --input_size. CPU, a few seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from alphadecay.errors import UserError
from alphadecay.model import count_parameters
from alphadecay.vit.model import (ALIASES, ARCHS, DropPath, adapt_checkpoint, build_vit,
                                  model_names, resize_pos_embed, resolve_model_name)

FIXTURE = Path(__file__).parent / "data" / "deit_tiny_patch16_224_state_dict.json"


def test_deit_tiny_state_dict_equals_timms_keys_and_shapes():
    fixture = json.loads(FIXTURE.read_text())
    model = build_vit("vit_deit_tiny_patch16_224", num_classes=1000)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == fixture["keys"]  # same names, same shapes, same order
    assert count_parameters(model) == fixture["num_parameters"] == 5_717_416


def test_alias_builds_the_same_architecture():
    assert resolve_model_name("deit_tiny_patch16_224") == "vit_deit_tiny_patch16_224"
    a = build_vit("deit_tiny_patch16_224", num_classes=10, img_size=32)
    b = build_vit("vit_deit_tiny_patch16_224", num_classes=10, img_size=32)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_tuned_module_order_is_patch_conv_first_and_head_last():
    """The official module-wise decay walks Linear and Conv2d in module order and drops the first and last."""
    model = build_vit("vit_deit_tiny_patch16_224")
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert names[0] == "patch_embed.proj" and names[-1] == "head"
    per_block = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert names[1:-1] == [f"blocks.{i}.{s}" for i in range(12) for s in per_block]  # the 48 tuned modules


def test_cpu_model_is_a_few_hundred_thousand_parameters():
    model = build_vit("vit_tiny_patch4_32", num_classes=10)
    assert 100_000 < count_parameters(model) < 1_000_000
    assert model.pos_embed.shape == (1, (32 // 4) ** 2 + 1, ARCHS["vit_tiny_patch4_32"].embed_dim)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_input_size_sizes_pos_embed_and_rejects_non_multiples():
    model = build_vit("vit_deit_tiny_patch16_224", num_classes=5, img_size=64)
    assert model.pos_embed.shape == (1, 17, 192)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="64x64"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match=r"--input_size 40: .*multiple of 16"):
        build_vit("vit_deit_tiny_patch16_224", img_size=40)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        build_vit("vit_small_patch16_224")
    message = str(err.value)
    assert message.startswith("--model vit_small_patch16_224: unknown model.")
    for name in model_names():
        assert name in message
    assert set(model_names()) == set(ARCHS) | set(ALIASES)


def test_bad_drop_path_and_class_count_are_user_errors():
    with pytest.raises(UserError, match="--drop_path 1.0"):
        build_vit("vit_tiny_patch4_32", drop_path_rate=1.0)
    with pytest.raises(UserError, match="number of classes"):
        build_vit("vit_tiny_patch4_32", num_classes=0)


def test_initialisation_follows_timm_0_4_5():
    torch.manual_seed(0)
    model = build_vit("vit_deit_tiny_patch16_224")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.bias.abs().max() == 0, name
            assert abs(module.weight.std().item() - 0.02) < 0.002, name  # trunc_normal(.02), bounds +-2 never hit
        elif isinstance(module, nn.LayerNorm):
            assert module.eps == 1e-6
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    for p in (model.cls_token, model.pos_embed):
        assert 0.01 < p.std().item() < 0.03  # trunc_normal(.02), as timm 0.4.5 (not timm 0.9's 1e-6)
    conv = model.patch_embed.proj  # PyTorch's default: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in))
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0


def timm_0_4_5_trunc_normal_(tensor: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """timm 0.4.5's `trunc_normal_` (timm/models/layers/weight_init.py), mean 0: uniform draws through the inverse
    normal CDF."""
    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = norm_cdf(a / std), norm_cdf(b / std)
    with torch.no_grad():
        return tensor.uniform_(2 * low - 1, 2 * high - 1).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(min=a, max=b)


def test_initial_values_differ_from_timms_but_not_their_distribution(monkeypatch):
    """What the model docstring and the README's ViT differences say: the truncated normals come from torch's
    trunc_normal_ (this torch: normal draws, redrawn out of bounds), timm 0.4.5's from uniform draws through the
    inverse CDF, so the same seed gives other initial values, from the same distribution."""
    torch.manual_seed(0)
    ours = build_vit("vit_tiny_patch4_32", num_classes=10)
    monkeypatch.setattr(nn.init, "trunc_normal_", timm_0_4_5_trunc_normal_)
    torch.manual_seed(0)
    timms = build_vit("vit_tiny_patch4_32", num_classes=10)
    assert torch.equal(ours.patch_embed.proj.weight, timms.patch_embed.proj.weight)  # the same stream up to there
    quantiles = torch.linspace(0.01, 0.99, 99)
    for name in ("pos_embed", "blocks.0.attn.qkv.weight", "head.weight"):
        a, b = ours.get_parameter(name).detach().flatten(), timms.get_parameter(name).detach().flatten()
        assert (a - b).abs().max() > 0.01, name  # other values...
    a = torch.cat([ours.get_parameter(n).detach().flatten() for n, _ in ours.named_parameters() if "fc" in n])
    b = torch.cat([timms.get_parameter(n).detach().flatten() for n, _ in timms.named_parameters() if "fc" in n])
    assert torch.allclose(a.quantile(quantiles), b.quantile(quantiles), rtol=0, atol=1e-3)  # ...of one law


def test_drop_path_rates_rise_linearly_and_act_only_in_training():
    model = build_vit("vit_tiny_patch4_32", num_classes=10, drop_path_rate=0.1)
    depth = len(model.blocks)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)  # rate 0 at the first block
    rates = [b.drop_path.drop_prob for b in model.blocks[1:]]
    assert rates == pytest.approx([0.1 * i / (depth - 1) for i in range(1, depth)])
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    layer = DropPath(0.5).train()
    torch.manual_seed(0)
    out = layer(torch.ones(1000, 3, 4))
    per_sample = out.flatten(1)
    kept = per_sample[:, 0] != 0
    assert torch.all(per_sample[kept] == 2.0) and torch.all(per_sample[~kept] == 0.0)
    assert 400 < kept.sum() < 600


def hf_vit_from(model) -> nn.Module:
    """transformers' ViT holding our weights (q, k, v cut from the fused qkv rows in that order)."""
    from transformers import ViTConfig, ViTForImageClassification

    arch = ARCHS["vit_tiny_patch4_32"]
    config = ViTConfig(hidden_size=arch.embed_dim, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
                       intermediate_size=int(arch.embed_dim * arch.mlp_ratio), image_size=32, patch_size=4,
                       num_labels=model.num_classes, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    hf = ViTForImageClassification(config).eval()
    sd, D = model.state_dict(), arch.embed_dim
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
           "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    for i in range(arch.depth):
        ours, theirs = f"blocks.{i}.", f"vit.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{theirs}attention.{name}.weight"] = sd[ours + "attn.qkv.weight"][j * D:(j + 1) * D]
            out[f"{theirs}attention.{name}.bias"] = sd[ours + "attn.qkv.bias"][j * D:(j + 1) * D]
        for a, b in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"{theirs}{b}.weight"], out[f"{theirs}{b}.bias"] = sd[ours + a + ".weight"], sd[ours + a + ".bias"]
    hf.load_state_dict(out, strict=True)
    return hf


def test_forward_equals_an_independent_vit():
    """transformers' ViT (pre-norm, exact GELU, cls-token head) with the same weights gives the same logits."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch4_32", num_classes=7).eval()
    with torch.no_grad():  # move every parameter off its init so no term can hide (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = hf_vit_from(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, rtol=1e-4, atol=1e-5)


def test_timm_checkpoint_loads_and_pos_embed_resizes():
    torch.manual_seed(0)
    source = build_vit("vit_deit_tiny_patch16_224", num_classes=1000)
    checkpoint = {"model": source.state_dict()}  # DeiT's release format
    same = build_vit("deit_tiny_patch16_224", num_classes=1000)
    same.load_state_dict(adapt_checkpoint(checkpoint, same), strict=True)
    assert torch.equal(same.head.weight, source.head.weight)
    small = build_vit("deit_tiny_patch16_224", num_classes=1000, img_size=64)
    small.load_state_dict(adapt_checkpoint(checkpoint, small), strict=True)
    assert small.pos_embed.shape == (1, 17, 192)
    assert torch.equal(small.pos_embed[:, 0], source.pos_embed[:, 0])  # the cls row is kept


def test_resize_pos_embed_keeps_a_constant_grid_constant():
    pos = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 16, 4), 3.0)], dim=1)
    out = resize_pos_embed(pos, 65)
    assert out.shape == (1, 65, 4)
    assert torch.all(out[:, 0] == 7.0) and torch.allclose(out[:, 1:], torch.full((1, 64, 4), 3.0))
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(pos, 11)
