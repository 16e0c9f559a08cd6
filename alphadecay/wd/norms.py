"""Norms of parameters and gradients that are right whether the tensors are whole (one process, DDP replicas) or
DTensor shards (FSDP2): the one place where the weight-decay rules take norms.

The trap this avoids: `torch.linalg.vector_norm(W)` on a DTensor is a partial value, and `.item()` of it returns
the local shard's norm, without an error (shared/notes/fsdp2.md). Here each DTensor contributes its local shard's
sum of squares, one all-reduce per device mesh (normally one in all) sums them over the ranks that hold the
shards, and the square root is taken after. Replicated DTensors count their local value once; any other placement
(a partial tensor) is made whole with `full_tensor()`.

On plain tensors the result is what the rules computed before, bit for bit: `torch._foreach_norm`, each norm in
the tensor's dtype, then float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, a float64 (len(tensors),) tensor on the tensors' device, identical on every
    rank. A DTensor's norm is its whole tensor's, rounded to its dtype as torch._foreach_norm rounds a plain one."""
    from torch.distributed.tensor import DTensor

    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if not any(isinstance(t, DTensor) for t in tensors):
        return torch.stack([n.double() for n in torch._foreach_norm(tensors)])
    out: list[torch.Tensor | None] = [None] * len(tensors)
    plain = [i for i, t in enumerate(tensors) if not isinstance(t, DTensor)]
    if plain:
        for i, n in zip(plain, torch._foreach_norm([tensors[i] for i in plain])):
            out[i] = n.double()
    by_mesh: dict[tuple, list[int]] = {}  # (mesh, the mesh dims a tensor is sharded over) -> tensor indices
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            continue
        if not all(p.is_shard() or p.is_replicate() for p in t.placements):
            t = tensors[i] = t.full_tensor()  # partial: made whole (rare; not FSDP's parameters or gradients)
            out[i] = torch.linalg.vector_norm(t).double()
            continue
        sharded_dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
        by_mesh.setdefault((t.device_mesh, sharded_dims), []).append(i)
    for (mesh, dims), idx in by_mesh.items():
        local = [tensors[i].to_local() for i in idx]
        wide = torch.float64 if local[0].dtype == torch.float64 else torch.float32  # no bf16 partial norms
        squares = torch.stack([n.double() for n in torch._foreach_norm(local, 2, dtype=wide)]).square()
        for dim in dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        for i, square in zip(idx, squares.sqrt()):
            out[i] = square.to(tensors[i].dtype).double()  # the rounding _foreach_norm applies to a whole tensor
    device = out[0].device
    return torch.stack([n.to(device) for n in out])


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, …, t_n)‖: the root of the summed squared norms of `tensor_norms` (a 0-dim float64 tensor)."""
    return tensor_norms(tensors).pow(2).sum().sqrt()
