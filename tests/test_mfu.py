"""Model FLOPs per token (checked by hand), the peak table, and the CUDA-only throughput metrics (mocked GPU)."""

import pytest
import torch
from tqdm.auto import tqdm

from alphadecay import dist, mfu
from alphadecay.config import parse_args
from alphadecay.errors import UserError
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.wd.groups import module_param_groups
from alphadecay.trainer import Trainer
from tests.conftest import REPO, TINY_CONFIG


def test_60m_flops_per_token_by_hand():
    # llama_60m: d 512, d_ff 1376, 8 layers, vocab 32000, sequence 256.
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376  # q, k, v, o + gate, up, down
    assert per_layer == 1_048_576 + 2_113_536 == 3_162_112
    n_matmul = 8 * per_layer + 512 * 32000  # + lm_head; the embedding is a lookup
    assert n_matmul == 25_296_896 + 16_384_000 == 41_680_896
    attention = 12 * 8 * 256 * 512  # QK^T and AV over all 256 keys, forward + backward
    assert attention == 12_582_912
    expected = 6 * n_matmul + attention
    assert expected == 262_668_288
    config = load_model_config(str(REPO / "configs" / "llama_60m.json"))
    assert mfu.llama_flops_per_token(config, 256) == expected
    assert round(expected / 1e9, 3) == 0.263  # gpu-and-data.md
    # A causal kernel computes (T+1)/2 keys per query on average.
    assert mfu.llama_flops_per_token(config, 256, causal=True) == 6 * n_matmul + 6 * 8 * 257 * 512


@pytest.mark.parametrize("size,gflops", [("130m", 0.685), ("350m", 2.09), ("1b", 7.79)])
def test_other_sizes_match_the_notes(size, gflops):
    config = load_model_config(str(REPO / "configs" / f"llama_{size}.json"))
    assert mfu.llama_flops_per_token(config, 256) / 1e9 == pytest.approx(gflops, abs=0.006)


@pytest.mark.parametrize("size", ["1m", "60m"])
def test_matmul_parameters_are_the_models_linear_weights(size):
    config = load_model_config(str(REPO / "configs" / f"llama_{size}.json"))
    with torch.device("meta"):
        model = build_model(config, seed=0)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_matmul = mfu.matmul_params(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                 num_layers=config.num_hidden_layers, vocab_size=config.vocab_size)
    assert n_matmul == linear
    assert n_matmul == sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel() - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n)


def test_grouped_query_attention_counts_narrower_k_and_v():
    full = mfu.matmul_params(hidden_size=64, intermediate_size=100, num_layers=2, vocab_size=10)
    gqa = mfu.matmul_params(hidden_size=64, intermediate_size=100, num_layers=2, vocab_size=10, kv_dim=16)
    assert full - gqa == 2 * 2 * 64 * (64 - 16)


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A10", None), ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table(name, tflops):
    assert mfu.peak_tflops_for(name) == tflops


def test_device_peak_flops_reads_the_gpu_name_and_the_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert mfu.device_peak_flops(cuda) == 989e12
    assert mfu.device_peak_flops(cuda, 500.0) == 500e12
    assert mfu.device_peak_flops(torch.device("cpu"), 500.0) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert mfu.device_peak_flops(cuda) is None


def test_throughput_metrics():
    out = mfu.throughput_metrics(positions=2_000_000, seconds=4.0, flops_per_token=2e8, peak_flops=1e15)
    assert out == {"tokens_per_s_per_device": 500_000.0, "mfu": pytest.approx(0.1)}
    assert mfu.throughput_metrics(positions=10, seconds=2.0, flops_per_token=2e8, peak_flops=None) == {
        "tokens_per_s_per_device": 5.0}


class ListLogger:
    def __init__(self):
        self.records = []

    def log(self, metrics, step):
        self.records.append(metrics)


def logged_metrics(device: torch.device, argv=()) -> dict:
    config, _ = parse_args(["--model_config", TINY_CONFIG, "--max_length", "64", *argv])
    raw = build_model(load_model_config(TINY_CONFIG), seed=0)
    optimizer = build_optimizer(module_param_groups(raw, 0.0), config, torch.device("cpu"))
    trainer = Trainer.for_updates(config, dist.DistInfo(0, 0, 2, device), raw, optimizer)
    trainer.logger = ListLogger()
    window = {"loss": 40.0, "targets": 10, "tokens": 3000, "positions": 2048, "time": 0.5, "grad_norm": 1.0}
    with tqdm(disable=True) as bar:
        trainer._log_train(window, 1e-3, bar, {})
    return trainer.logger.records[-1]


def test_train_metrics_carry_mfu_on_a_known_gpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    config = load_model_config(TINY_CONFIG)
    flops = mfu.llama_flops_per_token(config, 64)
    record = logged_metrics(torch.device("cuda", 0))
    assert record["tokens_per_s"] == 6000.0  # non-pad tokens of all ranks, as before
    assert record["tokens_per_s_per_device"] == 4096.0  # this rank's positions, pads included
    assert record["mfu"] == pytest.approx(flops * 4096.0 / 312e12)
    assert logged_metrics(torch.device("cuda", 0), ["--peak_tflops", "100"])["mfu"] == pytest.approx(
        flops * 4096.0 / 100e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    unknown = logged_metrics(torch.device("cuda", 0))
    assert "mfu" not in unknown and unknown["tokens_per_s_per_device"] == 4096.0
    on_cpu = logged_metrics(torch.device("cpu"))
    assert "mfu" not in on_cpu and "tokens_per_s_per_device" not in on_cpu


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_peak_tflops_must_be_positive(value):
    with pytest.raises(UserError, match="--peak_tflops must be a positive number"):
        parse_args(["--peak_tflops", value])
