"""Model FLOPs utilisation (MFU): the share of a device's peak dense bf16 FLOP/s that the model's own arithmetic
uses. Pure functions; the trainer logs `tokens_per_s_per_device` and `mfu` on CUDA.

Model FLOPs per token of one training update (forward + backward) of a LLaMA at sequence length T:

    F = 6 · N_matmul + A,    N_matmul = L · (2·d·d_q + 2·d·d_kv + 3·d·d_ff) + d·V

- N_matmul counts the weights that multiply activations: per decoder layer q_proj and o_proj (d × d_q, d_q =
  heads · head_dim = d for these configs), k_proj and v_proj (d × d_kv, d_kv = kv_heads · head_dim), gate_proj,
  up_proj and down_proj (d × d_ff), and lm_head (d × V). Not counted: the token embedding (a lookup, no
  multiply-adds), the RMSNorm gains, rotary embeddings, softmax, SiLU, residual adds and the loss (all elementwise:
  the largest, the loss, is ~5·V FLOPs per token, 0.06% at 60M).
- 6 = 2 FLOPs per multiply-add in the forward pass plus twice that in the backward pass (gradients with respect to
  the inputs and to the weights).
- A is the attention itself, QKᵀ and the weighted sum of V, which have no weights: forward 2·T·d_q + 2·T·d_q per
  token and layer over all T keys, three times that with the backward pass: A = 12 · L · T · d_q (full attention,
  `causal=False`, the default). A causal mask leaves (T + 1)/2 keys per query on average, A = 6 · L · (T + 1) ·
  d_q (`causal=True`); kernels that skip masked blocks (FlashAttention, SDPA's flash/efficient paths) do about
  that much work.

The default counts full attention because that is the convention of PaLM (Chowdhery et al. 2022, appendix B),
nanoGPT's `estimate_mfu`, torchtitan and llm-foundry, so our MFU compares with theirs and with the anchors in
shared/notes/gpu-and-data.md; it overstates a causal kernel's work by 6·L·T·d per token (2.4% of F at 60M).
Recomputation under --activation_checkpointing is not counted: these are model FLOPs, not hardware FLOPs.

Checked by hand for llama_60m (d 512, d_ff 1376, L 8, V 32000, T 256): N_matmul = 8·(4·512² + 3·512·1376) +
512·32000 = 41,680,896; F = 6·41,680,896 + 12·8·256·512 = 250,085,376 + 12,582,912 = 262,668,288 ≈ 0.263 GFLOP,
the figure in gpu-and-data.md (130M: 0.685 GFLOP); with causal=True 0.256 GFLOP.

MFU = F · tokens/s per device / peak FLOP/s, where tokens are all positions the model processes (pads included:
they cost the same arithmetic). The peak is the device's dense (no sparsity) bf16 tensor-core rate from
PEAK_BF16_TFLOPS, matched against `torch.cuda.get_device_name()`, or `--peak_tflops`; on an unknown device MFU is
omitted rather than guessed.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (NVIDIA data sheets; the sparsity figures are twice these). The first entry whose
# name occurs in the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),  # SXM and PCIe alike
)


def matmul_params(*, hidden_size: int, intermediate_size: int, num_layers: int, vocab_size: int,
                  q_dim: int | None = None, kv_dim: int | None = None) -> int:
    """N_matmul: weights of the decoder layers' Linears and of lm_head (not the embedding); see the module doc."""
    q_dim = hidden_size if q_dim is None else q_dim
    kv_dim = q_dim if kv_dim is None else kv_dim
    per_layer = 2 * hidden_size * q_dim + 2 * hidden_size * kv_dim + 3 * hidden_size * intermediate_size
    return num_layers * per_layer + hidden_size * vocab_size


def model_flops_per_token(*, hidden_size: int, intermediate_size: int, num_layers: int, vocab_size: int,
                          seq_len: int, q_dim: int | None = None, kv_dim: int | None = None,
                          causal: bool = False) -> float:
    """F = 6 · N_matmul + attention (12·L·T·d_q full, 6·L·(T+1)·d_q causal): FLOPs per token of one update."""
    q_dim = hidden_size if q_dim is None else q_dim
    n = matmul_params(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                      vocab_size=vocab_size, q_dim=q_dim, kv_dim=kv_dim)
    attention = 6 * num_layers * (seq_len + 1) * q_dim if causal else 12 * num_layers * seq_len * q_dim
    return float(6 * n + attention)


def llama_flops_per_token(config, seq_len: int, *, causal: bool = False) -> float:
    """model_flops_per_token for a transformers LlamaConfig."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return model_flops_per_token(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                 num_layers=config.num_hidden_layers, vocab_size=config.vocab_size, seq_len=seq_len,
                                 q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, causal=causal)


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device named like torch.cuda.get_device_name(), or None if not in the table."""
    lowered = device_name.lower()
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name.lower() in lowered), None)


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of a CUDA device (--peak_tflops if given, else the table); None on other devices or unknown
    GPUs."""
    if device.type != "cuda":
        return None
    tflops = override_tflops if override_tflops is not None else peak_tflops_for(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def throughput_metrics(*, positions: int, seconds: float, flops_per_token: float | None,
                       peak_flops: float | None) -> dict[str, float]:
    """`tokens_per_s_per_device` (positions processed by one device per second, pads included) and, when both the
    model's FLOPs per token and the device's peak are known, `mfu` (a fraction, not a percentage)."""
    rate = positions / max(seconds, 1e-9)
    metrics = {"tokens_per_s_per_device": rate}
    if flops_per_token is not None and peak_flops:
        metrics["mfu"] = flops_per_token * rate / peak_flops
    return metrics
