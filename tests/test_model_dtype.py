"""Pure bf16 keeps the RoPE frequencies in float32, so the rotations are the official model's."""

import torch

from alphadecay.model import build_model, cast_model, load_model_config
from tests.conftest import TINY_CONFIG


def official_cos_sin(head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GaLore's LlamaRotaryEmbedding (peft_pretraining/modeling_llama.py): float32 angles, cached, then cast."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.einsum("i,j->ij", torch.arange(positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def test_bf16_model_rotates_by_the_official_angles():
    config = load_model_config(TINY_CONFIG)
    head_dim = config.hidden_size // config.num_attention_heads
    x, positions = torch.zeros(1, 256, head_dim, dtype=torch.bfloat16), torch.arange(256)[None]
    want_cos, want_sin = official_cos_sin(head_dim, 256)
    plain = build_model(config, seed=0).to(torch.bfloat16)
    assert not torch.equal(plain.model.rotary_emb(x, positions)[0][0], want_cos)  # bf16 frequencies: other angles
    model = cast_model(build_model(config, seed=0), "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    cos, sin = model.model.rotary_emb(x, positions)
    assert torch.equal(cos[0], want_cos) and torch.equal(sin[0], want_sin)
    assert model(input_ids=torch.randint(3, 8000, (2, 16))).logits.dtype == torch.bfloat16
