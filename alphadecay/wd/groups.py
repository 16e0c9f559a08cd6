"""Optimizer parameter groups, built by one function from any model and addressed by name.

`module_param_groups(model, weight_decay)` gives one group per line:
- every weight module (nn.Linear, nn.Conv2d, Hugging Face's Conv1D), named by the module, holding its weight and
  its bias (as the official ViT code groups them): LLaMA `model.layers.3.mlp.up_proj`, ..., `lm_head`; ViT
  `patch_embed.proj`, `blocks.3.attn.qkv`, ..., `head`; GPT-2 `transformer.h.3.attn.c_attn`, ...; with its `kind`
  (q/k/v/o/gate/up/down/head/qkv/proj/fc1/fc2/conv/linear, `module_kind`) and transformer block index `layer`;
- `embeddings`: nn.Embedding weights and the ViT's `cls_token` / `pos_embed` (timm's names, `dist_token` too). A
  weight module whose weight *is* an embedding (a tied output head: GPT-2's lm_head) has no group of its own: the
  tied tensor is in `embeddings`, once;
- `norms`: the parameters of normalisation layers (any module class whose name contains "Norm": LayerNorm, RMSNorm,
  ...) and any other parameter whose name contains `norm`;
- `other`: whatever is left (a learnable scalar, say), at the base decay. Our LLaMA and ViT have none.
Every parameter is in exactly one group (checked), and no group is empty. Each group carries `base_weight_decay`
(what Uniform gives it), `wd_multiplier` and `lr_scale` (1; the layerwise scaling rules change it); a weight-decay
scheduler sets the multiplier, so the group's decay is `base_weight_decay * multiplier`. The paper decays every
parameter, norms and embedding included: that is the default (`decay_norms`, `decay_embeddings`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# module name (its last one or two components) -> kind; LLaMA/Mistral/Qwen2, the ViT, GPT-2, GPT-NeoX
MODULE_KINDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down", "lm_head": "head", "qkv": "qkv", "proj": "proj", "fc1": "fc1", "fc2": "fc2",
                "head": "head", "c_attn": "qkv", "attn.c_proj": "proj", "c_fc": "fc1", "mlp.c_proj": "fc2",
                "query_key_value": "qkv", "attention.dense": "proj", "dense_h_to_4h": "fc1", "dense_4h_to_h": "fc2",
                "embed_out": "head"}
# The kinds of the attention and the MLP matrices (LLaMA/Mistral/Qwen2's, then the fused ones of GPT-2, GPT-NeoX
# and the ViT): the split the spectral report and the figures compare.
ATTENTION_KINDS = ("q", "k", "v", "o", "qkv", "proj")
MLP_KINDS = ("gate", "up", "down", "fc1", "fc2")
EMBEDDING_PARAMETERS = re.compile(r"(^|\.)(cls_token|dist_token|pos_embed)$")  # parameters that are embeddings
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)\.")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 and relatives): a linear layer whose weight is stored as (in, out). Detected by
    its class, without importing transformers (torch.nn.Conv1d is another thing: a 3-D convolution weight)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def is_weight_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module)


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear, nn.Conv2d and Conv1D in `named_modules()` order: the official code's candidates for
    module-wise decay (WeightDecayUnbalance.py:216-217; it knew Linear and Conv2d). LLaMA has Linears only; the ViT
    starts with its patch Conv2d; GPT-2 has Conv1Ds and a tied lm_head."""
    return [(name, module) for name, module in model.named_modules() if is_weight_module(module)]


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear in `named_modules()` order (per block q, k, v, o, gate, up, down; then lm_head)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def module_matrix(module: nn.Module) -> torch.Tensor:
    """A weight module's matrix, (out, in), the one its spectrum is taken of: a Linear's weight as it is, a Conv1D's
    transposed (stored as (in, out)), a Conv2d's (out, in, kh, kw) reshaped to (out, in * kh * kw) (the linear map
    it applies to each patch)."""
    return module.weight.T if is_conv1d(module) else as_matrix(module.weight)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear's or Conv2d's weight as a matrix (out, in * kh * kw)."""
    return weight.reshape(weight.shape[0], -1)


def layer_index(name: str) -> int | None:
    """The transformer block a module belongs to (`model.layers.<i>.`, the ViT's `blocks.<i>.`, GPT-2's `h.<i>.`),
    or None (embedding, norm, head, patch embedding)."""
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """The kind of a weight module from its name (MODULE_KINDS), 'linear' when unknown."""
    parts = name.split(".")
    return MODULE_KINDS.get(".".join(parts[-2:]), MODULE_KINDS.get(parts[-1], "linear"))


def tied_modules(model: nn.Module) -> set[str]:
    """Weight modules whose weight is also another module's parameter (a tied output head)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {name for name, module in weight_modules(model) if len(owners[id(module.weight)]) > 1}


def module_param_groups(model: nn.Module, weight_decay: float, *, decay_norms: bool = True,
                        decay_embeddings: bool = True) -> list[dict]:
    """Named optimizer groups covering every parameter exactly once (module docstring), for torch's optimizers:
    `torch.optim.AdamW(module_param_groups(model, 0.1), lr=...)`."""
    groups: list[dict] = []
    owner: dict[int, str] = {}

    def add(name: str, kind: str, params: list[nn.Parameter], decay: float, layer: int | None = None) -> None:
        params = [p for p in {id(p): p for p in params}.values() if id(p) not in owner]  # each once, in order
        for p in params:
            owner[id(p)] = name
        if params:
            groups.append({"name": name, "kind": kind, "layer": layer, "params": params, "base_weight_decay": decay,
                           "weight_decay": decay, "wd_multiplier": 1.0, "lr_scale": 1.0})

    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    embedding_ids = {id(p) for p in embeddings}
    for name, module in weight_modules(model):
        if id(module.weight) in embedding_ids:
            continue  # a tied head: its weight is the embedding's, grouped there
        kind = "conv" if isinstance(module, nn.Conv2d) else module_kind(name)
        add(name, kind, [module.weight] + ([module.bias] if module.bias is not None else []), weight_decay,
            layer_index(name))
    embeddings += [p for n, p in model.named_parameters() if EMBEDDING_PARAMETERS.search(n)]
    add("embeddings", "embedding", embeddings, weight_decay if decay_embeddings else 0.0)
    norm_layers = [m for m in model.modules() if "Norm" in type(m).__name__]
    norms = [p for m in norm_layers for p in m.parameters(recurse=False)]
    norms += [p for n, p in model.named_parameters() if re.search(r"norm", n)]
    add("norms", "norm", norms, weight_decay if decay_norms else 0.0)
    add("other", "other", list(model.parameters()), weight_decay)
    return groups


def mean_weight_decay(param_groups: list[dict]) -> float:
    """Parameter-weighted mean of the groups' effective decays (a group's `effective_weight_decay`, which a
    scheduler sets when a rule applies the decay itself, else its `weight_decay`)."""
    sizes = [sum(p.numel() for p in g["params"]) for g in param_groups]
    return sum(n * g.get("effective_weight_decay", g["weight_decay"])
               for n, g in zip(sizes, param_groups)) / max(1, sum(sizes))


def describe(param_groups: list[dict]) -> str:
    """One line per group: name, tensors, parameters, decay and learning-rate scale."""
    lines = [f"{'group':<40} {'tensors':>7} {'params':>12} {'decay':>10} {'lr x':>6}"]
    for g in param_groups:
        numel = sum(p.numel() for p in g["params"])
        name = g.get("name", "(unnamed)")
        lines.append(f"{name:<40} {len(g['params']):>7} {numel:>12,} {g['weight_decay']:>10.3g} "
                     f"{g.get('lr_scale', 1.0):>6.3g}")
    return "\n".join(lines)
