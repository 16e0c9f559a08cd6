"""The 9 official ViT command lines (tests/data/official_vit_commands.txt): each parses as written and means what its
folder says, and each runs as written (main.py -> vit_main.py) with a CPU-sized model, one epoch on a few of the
shipped digits, and applies its own method: Uniform no module-wise decay at all, AWD AWD, AdaDecay and
AlphaDecay theirs."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from alphadecay.vit.config import parse_vit_args
from tests.conftest import REPO, read_metrics, run_vit

COMMANDS = REPO / "tests" / "data" / "official_vit_commands.txt"
FOLDER_METHOD = {"Uniform": "uniform", "baseline1": "awd", "baseline2": "adadecay", "Ours": "alphadecay"}
BLOCK_MODULES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def commands() -> list:
    lines = [line.split("\t") for line in COMMANDS.read_text().splitlines() if line and not line.startswith("#")]
    return [pytest.param(path, args, id=path.split("scripts/", 1)[1]) for path, args in lines]


def meaning(path: str) -> tuple[str, float]:
    """(method, weight decay) from the script's folder and file name."""
    return FOLDER_METHOD[Path(path).parent.name], float(Path(path).stem)


def test_the_file_holds_the_9_scripts():
    assert sorted(meaning(p.values[0]) for p in commands()) == sorted(
        [("uniform", 0.0), ("uniform", 1e-6), ("uniform", 5e-6), ("awd", 1e-6), ("awd", 5e-6),
         ("adadecay", 1e-6), ("adadecay", 5e-6), ("alphadecay", 1e-6), ("alphadecay", 5e-6)])


@pytest.mark.parametrize("path,args", commands())
def test_official_command_line_parses_as_its_folder_says(path, args):
    config, _ = parse_vit_args(shlex.split(args))
    method, wd = meaning(path)
    assert (config.wd_method(), config.weight_decay) == (method, wd)
    assert (config.model, config.drop_path, config.batch_size, config.lr, config.update_freq) == \
        ("vit_deit_tiny_patch16_224", 0.1, 192, 4e-3, 1)
    assert (config.model_ema, config.model_ema_eval, config.epochs, config.warmup_epochs) == (True, True, 120, 20)
    assert (config.aa, config.mixup, config.cutmix, config.reprob, config.smoothing) == \
        ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 0.1)
    if method == "alphadecay":  # the 1e-6 script uses max ratio 5, the 5e-6 script 3 (vit.md)
        assert (config.wd_min_ratio, config.wd_max_ratio) == (0.6666, 5.0 if wd == 1e-6 else 3.0)
    if method == "uniform":
        assert not config.use_modulewise_wd and not config.alpha_positively_with_WD


@pytest.mark.parametrize("path,args", commands())
def test_official_command_line_runs_its_own_method(path, args, digits_subset, tmp_path):
    """As written, plus a CPU size: the 4-block model at 32 px, one epoch of 10 updates of 8 images (80 train,
    20 val images), full official augmentation, EMA on. The module-wise pass runs at update 0 (epoch 0)."""
    cpu = ["--model", "vit_tiny_patch4_32", "--input_size", "32", "--epochs", "1", "--batch_size", "8",
           "--data_path", str(digits_subset), "--output_dir", str(tmp_path), "--num_workers", "0",
           "--wandb_mode", "disabled"]
    assert run_vit(shlex.split(args) + cpu) == 0
    method, wd = meaning(path)
    events = read_metrics(tmp_path)
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 11))
    final = next(e for e in events if "top1" in e)
    assert final["step"] == 10 and {"ema_top1", "ema_top5", "top5", "eval_loss"} <= set(final)
    state = torch.load(tmp_path / "model_10" / "training_state.pt", weights_only=False)
    decay = {g["name"]: g["weight_decay"] for g in state["optimizer"]["param_groups"]}
    tuned = [f"blocks.{i}.{m}" for i in range(4) for m in BLOCK_MODULES]
    untuned = [n for n in decay if n not in tuned]
    keys = {k.split("/")[0] for e in events for k in e if "/" in k}
    if method == "uniform":
        assert keys == set() and set(decay.values()) == {wd}
    elif method == "awd":
        assert keys == {"awd"}
        lambda_bar = [e["awd/lambda_bar"] for e in events if "awd/lambda_bar" in e]
        assert len(lambda_bar) == 10 and list(decay.values()) == pytest.approx([lambda_bar[-1]] * len(decay))
        assert 0 < lambda_bar[-1] != wd
    else:
        first = next(e for e in events if "wd_multiplier_mean" in e)
        assert first["step"] == 1 and first["wd_tuned_modules"] == 16  # one pass, at the epoch's first update
        assert sum("wd_multiplier_mean" in e for e in events) == 1
        assert {decay[n] for n in untuned} == {wd}
        tuned_decay = np.array([decay[n] for n in tuned]) / wd
        if method == "adadecay":
            assert keys == {"gradnorm", "wd"}
            assert tuned_decay.min() > 0 and tuned_decay.max() < 2 and tuned_decay.std() > 0.1
        else:
            assert keys == {"alpha", "wd"}
            ratio = 5.0 if wd == 1e-6 else 3.0
            assert tuned_decay.min() == pytest.approx(0.6666) and tuned_decay.max() == pytest.approx(ratio)
