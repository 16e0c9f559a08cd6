"""Process-group setup from the torchrun environment, and the few collectives the trainer needs.

Plain `python torchrun_main.py` runs one process without a process group; `torchrun --nproc_per_node=N`
sets RANK/WORLD_SIZE/LOCAL_RANK and we initialise NCCL on CUDA or gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from alphadecay.errors import UserError


DEFAULT_TIMEOUT_MINUTES = 10.0  # --dist_timeout


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """Map --device {auto,cpu,cuda} to a torch.device; `auto` takes this rank's GPU when there is one."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was given but torch sees no CUDA device; use --device cpu or auto.")
    return torch.device("cuda", local_rank)


def setup(requested_device: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistInfo:
    """Initialise the process group when launched by torchrun with more than one process.

    timeout_minutes (--dist_timeout) is how long a collective waits for the other ranks: after it, NCCL's watchdog
    aborts the waiting ranks and gloo raises in them, so a rank that died does not leave the others waiting for a
    launcher that may never stop them. The same for both backends (torch's defaults: 10 min NCCL, 30 min gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(**process_group_options(device), rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def process_group_options(device: torch.device) -> dict:
    """NCCL bound to this rank's GPU on CUDA (device_id: the communicator is created at once on that device, and
    collectives such as barrier() need not guess it), gloo on CPU."""
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device}
    return {"backend": "gloo"}


def ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel as every entry point wraps its model: on this rank's GPU (no device_ids on CPU),
    without broadcasting buffers each forward (the models' buffers are constants, identical on every rank), and
    with the gradients as views into its all-reduce buckets (one copy of the gradients instead of two: 2.7 GB at
    1B in bf16). After zero_grad(set_to_none=True) the synchronising backward copies each fresh gradient into its
    bucket as soon as it is ready and frees it, so the saving holds for an update of one micro-batch; the
    micro-batches before the last (no_sync) still accumulate into fresh gradients. The values are unchanged."""
    from torch.nn.parallel import DistributedDataParallel

    # forward_sync_buffers=False (torch 2.13's name for the deprecated broadcast_buffers=False, which warns): no
    # broadcast each forward; DDP's construction still syncs the buffers once from rank 0, a no-op for constants.
    return DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                   forward_sync_buffers=False, gradient_as_bucket_view=True)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op without a process group) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (a one-element list without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values in `tensor`, in place on every rank (a no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def on_main(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` run on rank 0 only, its result on every rank. A UserError it raises is raised on every
    rank, so a run that stops for it stops everywhere, with no rank left waiting in a collective."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    result = error = None
    if not distributed or dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except UserError as err:
            error = err
    if distributed:
        result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
