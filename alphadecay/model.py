"""LLaMA from the official config JSONs, as transformers' LlamaForCausalLM with SDPA attention.

The JSONs keep GaLore/AlphaDecay's keys and values (pad_token_id -1, max_sequence_length 1024, untied head).
Two of those values are quirks of the official setup that we keep on purpose:
- pad_token_id -1 makes the embedding's padding_idx the last row (31999 for vocab 32000), whose embedding is
  initialised to zero and never receives a gradient (official-code.md §5 #23);
- max_sequence_length is not a LlamaConfig key, so RoPE uses LlamaConfig's default 2048 positions.
The padding mask is never passed: rows are right-padded and attention is causal, so no real token attends to a
pad, and SDPA keeps its fast causal path (the official model also ignores the mask).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from alphadecay.device_init import built_on
from alphadecay.errors import UserError

REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def load_model_config(path: str) -> LlamaConfig:
    """Read and check a LLaMA config JSON; every problem is reported with the file's name."""
    if not os.path.isfile(path):
        configs = sorted(f for f in os.listdir("configs") if f.endswith(".json")) if os.path.isdir("configs") else []
        raise UserError(f"--model_config {path}: no such file. Available: {', '.join('configs/' + c for c in configs) or 'none'}.")
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"--model_config {path} is not valid JSON ({err}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"--model_config {path} must hold a JSON object of LlamaConfig keys.")
    missing = [k for k in REQUIRED_KEYS if not isinstance(raw.get(k), int) or raw[k] <= 0]
    if missing:
        raise UserError(f"--model_config {path} lacks positive integer values for: {', '.join(missing)}.")
    if raw.get("model_type", "llama") != "llama":
        raise UserError(f"--model_config {path} has model_type {raw['model_type']!r}; only 'llama' is supported.")
    if raw["hidden_size"] % raw["num_attention_heads"]:
        raise UserError(f"--model_config {path}: hidden_size {raw['hidden_size']} is not divisible by "
                        f"num_attention_heads {raw['num_attention_heads']}.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the warning about the official pad_token_id -1
    try:
        config = LlamaConfig.from_dict(raw)
    finally:
        hf_logging.set_verbosity(verbosity)
    config.use_cache = False
    config.tie_word_embeddings = False
    config._attn_implementation = "sdpa"
    return config


def build_model(config: LlamaConfig, *, seed: int, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A freshly initialised float32 model: N(0, initializer_range) Linear/Embedding weights, unit norms.

    The parameters are built on `device` with the values a CPU build gives, bit for bit, and the host holds one
    tensor at a time rather than the whole float32 model (alphadecay/device_init.py); the buffers (RoPE's
    frequencies) stay on the host, so move the model with `cast_model`."""
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with built_on(device):
            model = LlamaForCausalLM(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def cast_model(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(device, dtype), but the RoPE frequencies stay float32, so pure bf16 rotates by the official angles.

    transformers computes cos/sin on the fly from the `inv_freq` buffer, which `.to(bfloat16)` would round
    (relative error up to 2^-9: at position 255 some rotation angles would be off by up to ~0.25 rad). The
    official GaLore model caches cos/sin computed in float32 from float32 frequencies and only then rounds them to
    bf16; with float32 frequencies transformers' cos/sin are those same values. The buffers are non-persistent:
    checkpoints do not hold them.
    """
    frequencies = {name: buf.detach().clone() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(device=device, dtype=dtype)
    for name, freq in frequencies.items():
        owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(owner, attr, freq.to(device=device, dtype=torch.float32))
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, bool, str]:
    """(parameter dtype, bf16 autocast?, resolved name) for --dtype.

    auto is bfloat16 only on a GPU of compute capability 8.0 or newer (A100, H100, RTX 30xx/40xx): earlier GPUs
    (V100, T4) run bf16 by emulation, which torch.cuda.is_bf16_supported() still reports as supported.
    """
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) else "float32"
    dtype, autocast = {"bfloat16": (torch.bfloat16, False), "float32": (torch.float32, False),
                       "amp_bf16": (torch.float32, True)}[name]
    return dtype, autocast, name
