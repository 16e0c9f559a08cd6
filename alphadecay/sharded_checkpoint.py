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
  "format": "dcp";
- manifest.json, written last, over every other file, dcp/'s included (checkpoint.py's, the same code).
Plain files only, with the guarantees of DDP checkpoints (`save`; checkpoint.py): written into a temporary
directory, the manifest last, fsynced and renamed into place; a failed write removes the temporary directory and
stops every rank; `find_checkpoint` verifies a sharded checkpoint against its manifest before anything loads it
and a run directory resumes from its newest one that verifies; --keep_checkpoints prunes them. DCP writes from
every rank into rank 0's temporary directory, so on several nodes --save_dir must be on a filesystem all of them
see.

Loading reshards: DCP reads each tensor's stored pieces into whatever layout the loading model has, so an FSDP
checkpoint resumes under FSDP on any number of processes, on one process, and under DDP (each replica reads the
whole tensors). A DDP checkpoint (safetensors + an index-keyed optimizer state) resumes under FSDP too: the
weights are loaded before sharding, and the optimizer state is keyed by parameter name and sharded by
`set_optimizer_state_dict`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from alphadecay import dist
from alphadecay.checkpoint import (checkpoint_dir, estimate_checkpoint_bytes, io_failure, publish_checkpoint,
                                   save_failure_message, temporary_dir, tensor_bytes, write_training_state)
from alphadecay.errors import RunFault

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
         full_model: bool, resume_flag: str = "--continue_from") -> str:
    """Write model_<step> (module docstring) so that it is either complete and verifiable or absent, as
    `checkpoint.save_checkpoint` does; a collective: every rank calls it with its shards, `state` (what
    training_state.pt holds) matters on rank 0. full_model also writes the whole model as save_pretrained.
    Returns the directory.

    Several writers, one protocol: rank 0 names and creates the temporary directory (`checkpoint.temporary_dir`,
    its host and pid) and every rank writes its DCP shards into it; `dcp.save` returns on a rank only once every
    rank's files and DCP's .metadata are written. Rank 0 then writes the other files and ends the save as every
    save ends (`checkpoint.publish_checkpoint`: the manifest over every file, dcp/ included, written last, then
    the rename and the fsyncs). After each of these three phases the ranks exchange their errors (`_agree`), so a
    failure on any rank removes the temporary directory and stops every rank: a RunFault with the bytes needed
    and free for an I/O error, as save_checkpoint's; a bug keeps its traceback on its rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    final = checkpoint_dir(run_dir, step)
    tmp = dist.broadcast_object(temporary_dir(run_dir, step))  # rank 0's: every rank writes its shards there
    needed = estimate_checkpoint_bytes(model, optimizer) + tensor_bytes(state)  # DTensors count whole
    on_main = dist.rank() == 0

    def create() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    whole: dict[str, torch.Tensor] | None = None

    def shards() -> None:
        nonlocal whole
        dcp.save(_state(model, optimizer), storage_writer=_writer(os.path.join(tmp, DCP_DIR)))
        if full_model:  # rank 0 gets every tensor whole, on the CPU (the others get nothing)
            whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def finish() -> None:
        if whole is not None:
            model.save_pretrained(tmp, state_dict=whole, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
        write_training_state(tmp, {**state, "format": FORMAT})
        publish_checkpoint(tmp, run_dir, step)

    for phase, everywhere in ((create, False), (shards, True), (finish, False)):
        _agree(_attempt(phase) if everywhere or on_main else None, tmp=tmp, run_dir=run_dir, final=final,
               needed=needed, resume_flag=resume_flag)
    return final


def _writer(path: str):
    """DCP's FileSystemWriter (its defaults: one file per rank, fsynced), except that a write that fails for an I/O
    reason raises that OSError itself. DCP sends each rank's failure to the others pickled, which drops an
    exception's context: torch.save's RuntimeError ('unexpected pos ...') would arrive without the OSError behind
    it (a full disk, a file-size limit), and the run would stop with a traceback instead of the paragraph."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                return super().write_data(plan, planner)
            except Exception as err:
                seen: BaseException | None = err
                while seen is not None and not isinstance(seen, OSError):
                    seen = seen.__cause__ or seen.__context__
                if seen is None or seen is err:
                    raise
                raise OSError(seen.errno, seen.strerror, seen.filename) from None

    return Writer(path)


def _attempt(fn) -> BaseException | None:
    """fn()'s exception, or None. DCP raises a CheckpointException (a BaseException) on every rank when any rank's
    write failed; it is caught here too."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        fn()
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - handed to _agree, which raises
        return err
    return None


def _io_cause(err: BaseException) -> str | None:
    """checkpoint.io_failure, also for the rank failures a CheckpointException carries."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(err, CheckpointException):
        causes = [io_failure(exc) for exc, _ in err.failures.values()]
        return next((c for c in causes if c is not None), None)
    return io_failure(err)


def _agree(error: BaseException | None, *, tmp: str, run_dir: str, final: str, needed: int,
           resume_flag: str) -> None:
    """One phase of a save is over on every rank: nothing when no rank failed; otherwise rank 0 removes the
    temporary directory (every rank is here, so none is writing into it) and every rank raises: its own error if
    that was not an I/O error (a bug: its traceback), else a RunFault naming the I/O error (this rank's or
    another's), else a RuntimeError naming the ranks whose errors are in their own output."""
    report = None if error is None else (_io_cause(error), f"{type(error).__name__}: {error}".split("\n")[0])
    reports = dist.all_gather_objects(report)
    failed = [rank for rank, r in enumerate(reports) if r is not None]
    if not failed:
        return
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if error is not None and report[0] is None:
        raise error
    cause = next((r[0] for r in reports if r is not None and r[0] is not None), None)
    if cause is not None:
        raise RunFault(save_failure_message(run_dir, final, cause, needed, resume_flag)) from None
    raise RuntimeError(f"the checkpoint {final} could not be written: rank(s) {', '.join(map(str, failed))} failed "
                       f"({'; '.join(r[1] for r in reports if r is not None)}; the tracebacks are in their output). "
                       "The partial write was removed.")


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
