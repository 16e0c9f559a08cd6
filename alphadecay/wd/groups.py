"""Optimizer parameter groups, built by one function from any model and addressed by name.

Layout (one group per line):
- every Linear and Conv2d, named by its module, holding its weight and its bias (as the official ViT code groups
  them; the LLaMA Linears have no bias): LLaMA `model.layers.3.mlp.up_proj`, ..., `lm_head` (kind q/k/v/o/gate/
  up/down or head); ViT `patch_embed.proj` (kind conv), `blocks.3.attn.qkv`, `blocks.3.attn.proj`,
  `blocks.3.mlp.fc1`, `blocks.3.mlp.fc2`, `head` (kind qkv/proj/fc1/fc2/head); the transformer block index
  (`model.layers.<i>` / `blocks.<i>`) as `layer`;
- `embeddings`: nn.Embedding weights and the ViT's `cls_token` / `pos_embed` (timm's names, `dist_token` too);
- `norms`: every other parameter whose name contains `norm` (RMSNorm gains; LayerNorm weights and biases).
Every parameter is in exactly one group (checked). Each group carries `base_weight_decay` (what Uniform gives
it) and `lr_scale`; a weight-decay scheduler sets a per-group multiplier, so the group's decay is
`base_weight_decay * multiplier`. The paper decays every parameter, norms and embedding included: that is the
default (`--decay_norms`, `--decay_embeddings`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

LINEAR_KINDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "lm_head": "head",
                "qkv": "qkv", "proj": "proj", "fc1": "fc1", "fc2": "fc2", "head": "head"}  # LLaMA, then ViT
WEIGHT_MODULES = (nn.Linear, nn.Conv2d)  # the modules whose decay a module-wise method may set
EMBEDDING_PARAMETERS = re.compile(r"(^|\.)(cls_token|dist_token|pos_embed)$")  # parameters that are embeddings


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear in `named_modules()` order (per block q, k, v, o, gate, up, down; then lm_head)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear and nn.Conv2d in `named_modules()` order: the official code's candidates for module-wise
    decay (WeightDecayUnbalance.py:216-217). LLaMA has Linears only; the ViT starts with its patch Conv2d."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, WEIGHT_MODULES)]


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A module weight as the matrix its spectrum is taken of: a Linear's (out, in) as it is, a Conv2d's
    (out, in, kh, kw) reshaped to (out, in * kh * kw) (the linear map it applies to each patch)."""
    return weight.reshape(weight.shape[0], -1)


def layer_index(name: str) -> int | None:
    """The transformer block a module belongs to (LLaMA `model.layers.<i>.`, ViT `blocks.<i>.`), or None
    (embedding, norm, head, patch embedding)."""
    match = re.search(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def build_param_groups(model: nn.Module, *, weight_decay: float, decay_norms: bool = True,
                       decay_embeddings: bool = True) -> list[dict]:
    """Named optimizer groups covering every trainable parameter exactly once."""
    groups: list[dict] = []
    owner: dict[int, str] = {}

    def add(name: str, kind: str, params: list[nn.Parameter], decay: float, layer: int | None = None) -> None:
        for p in params:
            if id(p) in owner:
                raise AssertionError(f"parameter in two groups: {owner[id(p)]} and {name}")
            owner[id(p)] = name
        groups.append({"name": name, "kind": kind, "layer": layer, "params": params, "base_weight_decay": decay,
                       "weight_decay": decay, "wd_multiplier": 1.0, "lr_scale": 1.0})

    for name, module in weight_modules(model):
        kind = "conv" if isinstance(module, nn.Conv2d) else LINEAR_KINDS.get(name.rsplit(".", 1)[-1], "linear")
        add(name, kind, [module.weight] + ([module.bias] if module.bias is not None else []), weight_decay,
            layer_index(name))
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    embeddings += [p for n, p in model.named_parameters() if id(p) not in owner and EMBEDDING_PARAMETERS.search(n)]
    add("embeddings", "embedding", embeddings, weight_decay if decay_embeddings else 0.0)
    norms = [p for n, p in model.named_parameters() if id(p) not in owner and re.search(r"norm", n)]
    add("norms", "norm", norms, weight_decay if decay_norms else 0.0)

    leftover = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if leftover:
        raise AssertionError(f"parameters in no group: {leftover}")
    return [g for g in groups if g["params"]]


def apply_multipliers(optimizer: torch.optim.Optimizer, multipliers: dict[str, float]) -> None:
    """Set each named group's decay to base_weight_decay * multiplier; groups not named keep theirs."""
    by_name = {g["name"]: g for g in optimizer.param_groups}
    unknown = sorted(set(multipliers) - set(by_name))
    if unknown:
        raise KeyError(f"no parameter group named {unknown}")
    for name, multiplier in multipliers.items():
        group = by_name[name]
        group["wd_multiplier"] = float(multiplier)
        group["weight_decay"] = group["base_weight_decay"] * float(multiplier)


def mean_weight_decay(param_groups: list[dict]) -> float:
    """Parameter-weighted mean of the groups' effective decays."""
    sizes = [sum(p.numel() for p in g["params"]) for g in param_groups]
    return sum(n * g["weight_decay"] for n, g in zip(sizes, param_groups)) / max(1, sum(sizes))


def describe(param_groups: list[dict]) -> str:
    """One line per group: name, tensors, parameters, decay and learning-rate scale."""
    lines = [f"{'group':<40} {'tensors':>7} {'params':>12} {'decay':>10} {'lr x':>6}"]
    for g in param_groups:
        numel = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<40} {len(g['params']):>7} {numel:>12,} {g['weight_decay']:>10.3g} {g['lr_scale']:>6.3g}")
    return "\n".join(lines)
