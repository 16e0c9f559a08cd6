"""Shared test helpers: the shipped sample and tokenizer, a 1.1M-parameter LLaMA, CLI runners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphadecay.metrics import read_metrics  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parents[1]
SAMPLE = str(REPO / "data" / "c4_sample")
TOKENIZER = str(REPO / "data" / "tokenizer")
TINY_CONFIG = str(REPO / "configs" / "llama_1m.json")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines such as CI)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def train_args(save_dir, **overrides) -> list[str]:
    """CLI arguments of a small CPU run on the shipped sample; keyword arguments override or add flags."""
    flags = {
        "model_config": TINY_CONFIG, "dataset": SAMPLE, "tokenizer": TOKENIZER, "device": "cpu", "dtype": "float32",
        "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.1, "batch_size": 4, "total_batch_size": 8,
        "max_length": 64, "num_training_steps": 8, "warmup_steps": 2, "eval_every": 4, "save_every": 4,
        "target_eval_tokens": 4000, "shuffle_buffer": 64, "wandb_mode": "disabled",
        "save_dir": str(save_dir) if save_dir is not None else None,
    }
    flags.update(overrides)
    args = []
    for key, value in flags.items():
        if value is None:
            continue
        if value is True:
            args.append(f"--{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


def run_main(args: list[str]) -> int:
    """torchrun_main.main in this process."""
    sys.path.insert(0, str(REPO))
    import torchrun_main

    return torchrun_main.main(args)


# torchrun with two processes on this host (add --master_port=free_port() and the script)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]


def run_subprocess(args: list[str], *, launcher: list[str] | None = None, env: dict | None = None,
                   timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """torchrun_main.py in a fresh interpreter (or under `launcher`, e.g. torchrun)."""
    command = (launcher or [sys.executable]) + [str(REPO / "torchrun_main.py")] + args
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs)


def pretokenize_dir(out, **overrides) -> str:
    """`python -m alphadecay.pretokenize` in this process (the shipped sample and tokenizer, rows of 64 tokens);
    keyword arguments override or add flags. Returns the output directory."""
    from alphadecay import pretokenize

    flags = {"dataset": SAMPLE, "tokenizer": TOKENIZER, "out": str(out), "max_length": 64, "workers": 1}
    flags.update(overrides)
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    pretokenize.pretokenize(pretokenize.build_parser().parse_args(args))
    return str(out)


def by_step(metrics: list[dict], key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics if key in m}


def alphadecay_pass_decays(model: torch.nn.Module, every: int = 2) -> dict[str, float]:
    """The per-module decays of an AlphaDecay pass on a copy of `model`'s current weights (the official semantics,
    through the library), for checking what a callback applied at that update."""
    import copy

    import alphadecay.wd as wd

    twin = copy.deepcopy(model)
    scheduler = wd.create("alphadecay", twin, torch.optim.AdamW(wd.module_param_groups(twin, 0.1)), every=every)
    scheduler.step()
    return scheduler.last_weight_decays()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SHORT_ALPHADECAY_FLAGS = dict(wd_scheduler="alphadecay", unbalancedWD_every=2, lr=1e-2)  # short_alphadecay_run's


@pytest.fixture(scope="session")
def short_alphadecay_run(tmp_path_factory):
    """A finished 8-update AlphaDecay run of the 1.1M model with a module-wise pass every 2 updates (config.json,
    metrics.jsonl, checkpoints model_4/ and model_8/), for the tests that read a real run directory; resume it
    with SHORT_ALPHADECAY_FLAGS."""
    path = tmp_path_factory.mktemp("alphadecay_run") / "run"
    assert run_main(train_args(path, **SHORT_ALPHADECAY_FLAGS)) == 0
    return path


# -- the ViT (vit_main.py) ---------------------------------------------------------------------------------------
DIGITS = REPO / "data" / "digits_sample"


@pytest.fixture(scope="session")
def digits_subset(tmp_path_factory):
    """A copy of the first 8 train and 2 val images of each class of the shipped digits: 80 + 20 real images, so a
    ViT epoch on CPU takes a second or two."""
    import shutil

    root = tmp_path_factory.mktemp("digits_subset")
    for split, count in (("train", 8), ("val", 2)):
        for class_dir in sorted((DIGITS / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


def vit_args(data_path, output_dir, **overrides) -> list[str]:
    """CLI arguments of a small CPU ViT run: the CPU-sized model, light augmentation, no wandb; keyword arguments
    override or add flags (True = a bare flag, None = drop it)."""
    flags = {"model": "vit_tiny_patch4_32", "input_size": 32, "data_path": data_path, "output_dir": output_dir,
             "device": "cpu", "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "lr": 2e-3, "num_workers": 0,
             "wandb_mode": "disabled"}
    flags.update(overrides)
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def run_vit(args: list[str]) -> int:
    """vit_main.main in this process."""
    sys.path.insert(0, str(REPO))
    import vit_main

    return vit_main.main(args)
