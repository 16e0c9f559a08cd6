"""Checkpoints of FSDP runs: the model and the optimizer through torch.distributed.checkpoint (DCP), every rank
writing its own shards, resharded on load.

Layout of `<save_dir>/model_<step>/` written by a `--parallelism fsdp` run (the DDP layout is in checkpoint.py):
- dcp/: DCP's files, `.metadata` and one `__<rank>_0.distcp` per rank, holding the state dict
  {"model": the raw model's weights by parameter name, "optimizer": the optimizer's state by parameter name and
  its param groups (each group's name, current decay, base decay, multiplier, ...)} (torch's
  `get_model_state_dict` / `get_optimizer_state_dict` format);
- config.json: the model's configuration, so that a reader can build the model the shards belong to; the final
  checkpoint (the end of training) also has model.safetensors, gathered on rank 0: a `save_pretrained`
  directory as every DDP checkpoint is;
- training_state.pt / training_state.json: as in DDP checkpoints (step, tokens, the weight-decay scheduler,
  every rank's data position and RNG state, wandb id, config) but without the optimizer, and with
  "format": "dcp".
Plain files only, written into a temporary directory and renamed into place as DDP checkpoints are. DCP writes
from every rank into the same directory, so on several nodes --save_dir must be on a filesystem all of them see.

Loading reshards: DCP reads each tensor's stored pieces into whatever layout the loading model has, so an FSDP
checkpoint resumes under FSDP on any number of processes, on one process, and under DDP (each replica reads the
whole tensors). A DDP checkpoint (safetensors + an index-keyed optimizer state) resumes under FSDP too: the
weights are loaded before sharding, and the optimizer state is keyed by parameter name and sharded by
`set_optimizer_state_dict`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from alphadecay import dist
from alphadecay.checkpoint import STATE_FILE, checkpoint_dir

DCP_DIR = "dcp"
FORMAT = "dcp"


def is_sharded_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory `path` holds a DCP model (written by an FSDP run)."""
    return os.path.isfile(os.path.join(path, DCP_DIR, ".metadata"))


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The DCP state dict of a model (sharded or not) and its optimizer, in parameter-name keys."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
         full_model: bool) -> str:
    """Write model_<step> (module docstring); a collective: every rank calls it with its shards, `state` (what
    training_state.pt holds) matters on rank 0. full_model also writes the whole model as save_pretrained.
    Returns the directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    final = checkpoint_dir(run_dir, step)
    tmp = dist.broadcast_object(os.path.join(run_dir, f".tmp-model_{step}-{os.getpid()}"))
    if dist_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=os.path.join(tmp, DCP_DIR))
    whole = None
    if full_model:  # rank 0 gets every tensor whole, on the CPU (the others get nothing)
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_rank() == 0:
        if whole is not None:
            model.save_pretrained(tmp, state_dict=whole, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
        torch.save({**state, "format": FORMAT}, os.path.join(tmp, STATE_FILE))
        readable = {k: state[k] for k in ("step", "epoch", "tokens_seen", "train_time", "wandb_id") if k in state}
        with open(os.path.join(tmp, "training_state.json"), "w") as fh:
            json.dump({**readable, "format": FORMAT}, fh, indent=2)
        _publish(tmp, final)
    dist.barrier()
    return final


def _publish(tmp: str, final: str) -> None:
    """Rename the finished temporary directory into place (replacing an older checkpoint of the same step)."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def dist_rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def load_training_state(path: str) -> dict[str, Any]:
    """training_state.pt of a checkpoint (our own file: it holds numpy RNG states, so not weights_only)."""
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The weights (and the optimizer state, when `optimizer` is given) of the FSDP checkpoint `path` into
    `model` and `optimizer`, whatever their layout: FSDP on any number of processes, one process, DDP replicas
    (pass the raw model, not the DDP wrapper). A collective when a process group exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer)
    with warnings.catch_warnings():  # without a process group DCP reads in this process, and says so each time
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR), no_dist=not torch_dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A DDP checkpoint's optimizer state_dict (torch's index-keyed format, whole tensors) into `optimizer`: as is
    for plain parameters; for DTensor parameters keyed by parameter name and sharded by torch."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for p in params]
    by_name = {"state": {order[int(i)]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The LLaMA of an FSDP checkpoint directory, whole, in one process (or on every rank of a process group),
    from its config.json and DCP shards: what `python -m alphadecay.evaluate` and `alphadecay.esd` read when a
    checkpoint has no model.safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = LlamaConfig.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    load(path, model, None)
    return model
