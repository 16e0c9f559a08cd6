"""Checkpoints: one save and one load path for periodic, final and signal-triggered saves.

Layout of `<save_dir>/model_<step>/` (step = updates completed):
- the model in `save_pretrained` format (config.json + model.safetensors), loadable with
  `LlamaForCausalLM.from_pretrained`; a model without `save_pretrained` (the ViT) as its state_dict in
  model.safetensors, and any extra weights (the ViT's EMA) as <name>.safetensors;
- training_state.pt: optimizer (its param groups carry the current per-group decays), weight-decay scheduler
  state, step, tokens seen, every rank's data-stream position and RNG states, the wandb run id, the config;
- training_state.json: the counters in readable form.
A checkpoint is written to a temporary directory and renamed into place, so a crash never leaves a partial one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alphadecay.errors import UserError

STATE_FILE = "training_state.pt"


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"model_{step}")


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, state: dict[str, Any],
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write model_<step> atomically; `state` is everything but the weights; `extra_weights` maps a file stem to a
    state_dict saved beside the model. Returns the directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = os.path.join(run_dir, f".tmp-model_{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        os.makedirs(tmp)
        extra_weights = {"model": model.state_dict(), **(extra_weights or {})}
    for stem, weights in (extra_weights or {}).items():
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, os.path.join(tmp, f"{stem}.safetensors"))
    torch.save(state, os.path.join(tmp, STATE_FILE))
    readable = {k: state[k] for k in ("step", "epoch", "tokens_seen", "train_time", "wandb_id") if k in state}
    with open(os.path.join(tmp, "training_state.json"), "w") as fh:
        json.dump(readable, fh, indent=2)
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def find_checkpoint(path: str) -> str:
    """`path` itself if it is a checkpoint, else the run directory's checkpoint with the most updates."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise UserError(f"--continue_from {path}: no such directory.")
    steps = [int(m.group(1)) for d in os.listdir(path) if (m := re.fullmatch(r"model_(\d+)", d))
             and os.path.isfile(os.path.join(path, d, STATE_FILE))]
    if not steps:
        raise UserError(f"--continue_from {path}: neither a checkpoint (a model_<step> directory with {STATE_FILE}) "
                        f"nor a run directory containing one.")
    return checkpoint_dir(path, max(steps))


def latest_checkpoint(run_dir: str) -> str | None:
    """The run directory's checkpoint with the most updates, or None."""
    try:
        return find_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    except UserError:
        return None


def find_model_dir(path: str) -> str:
    """`path` itself when it holds model weights (a save_pretrained directory or a checkpoint), else the latest
    checkpoint of the run directory `path`: what the model-reading command lines (evaluate, esd) accept."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if any(os.path.isfile(os.path.join(path, w)) for w in weights):
        return path
    try:
        return find_checkpoint(path)
    except UserError:
        raise UserError(f"{path}: neither a save_pretrained model directory (config.json + model.safetensors or "
                        f"pytorch_model.bin), a checkpoint model_<step>, nor a run directory holding one.") from None


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (on `device`) and the training state of a checkpoint directory, without a host copy of either.

    safetensors reads the weights from the file's memory map to `device` one tensor at a time. training_state.pt
    (torch.save's zip format) is memory-mapped: its tensors (the optimizer state) are read from the page cache,
    which the ranks of a node share, when optimizer.load_state_dict copies them to the parameters' device (on the
    CPU the optimizer keeps them as copy-on-write pages of the map, and the file is never written)."""
    weights = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    # Our own file, written by save_checkpoint: it holds numpy RNG states, so not weights_only.
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False, mmap=True)
    return weights, state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
