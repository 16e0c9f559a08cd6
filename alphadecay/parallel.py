"""How several processes share the model: DDP replicas (`--parallelism ddp`, the default) or FSDP2 shards
(`--parallelism fsdp`), and the few places where the trainer must know which.

FSDP2 is torch's `torch.distributed.fsdp.fully_shard`, applied as torchtitan applies it to LLaMA
(torchtitan/models/llama3/parallelize.py): each decoder layer, then the token embedding, then the final norm
together with lm_head (one group: the backward pass starts there, so it stays unsharded after the forward pass),
then the root, which here is the model together with its loss (`alphadecay.loss.CausalLMLoss`), the module the
trainer runs. Every parameter becomes a DTensor sharded by rows (dim 0) over a 1-D device mesh of all
processes: each rank holds 1/N of every weight, of its gradient and of its Adam states, and a layer's weights are
all-gathered only while it computes. The raw model (`CausalLMLoss.model`) keeps its parameter names, so the
optimizer's named groups, the weight-decay methods and the checkpoints address the same names as under DDP.

Precision is unchanged: the parameters keep the run's dtype (pure bf16: bf16 weights, gradients and Adam states,
as the paper), and `MixedPrecisionPolicy` casts nothing. Only the gradient reduction's dtype is a choice
(`--reduce_dtype`): `param` reduce-scatters in the parameters' dtype, as DDP's all-reduce does; `float32` sums
the ranks' gradients in float32 and rounds the result once to the parameter dtype.

Gradient accumulation reduce-scatters after every micro-batch's backward pass (as torchtitan), and each rank adds
the reduced shard to its sharded gradient. The trade-off: GA reduce-scatters per update instead of one (each
overlapping the backward pass), against keeping the unsharded gradient of the whole model until the last
micro-batch (`set_requires_gradient_sync(False)`: 2 bytes per parameter in bf16, 14 GB for a 7B model, on every
rank), which would undo most of what sharding saves. DDP keeps its `no_sync` on all but the last micro-batch.

`--compile` under FSDP compiles each decoder layer in place (`nn.Module.compile`, so parameter names carry no
`_orig_mod.`), not the whole model: FSDP's hooks run between the compiled layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from alphadecay.loss import CausalLMLoss


def dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: object) -> bool:
    return isinstance(tensor, dtensor_cls())


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2)."""
    return any(is_dtensor(p) for p in model.parameters())


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process (a mesh of one rank: nothing is sharded, but the code paths
    are FSDP's); torchrun's multi-process runs already have one (`dist.setup`)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def reduce_dtype(name: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype FSDP reduces gradients in for --reduce_dtype (param: the parameters' own)."""
    return {"param": param_dtype, "float32": torch.float32}[name]


def fully_shard_llama(raw_model: nn.Module, device: torch.device, *, chunk_tokens: int, reduce_dtype: torch.dtype,
                      compile: bool) -> nn.Module:
    """CausalLMLoss(raw_model) with FSDP2 applied (module docstring): what the trainer runs. `raw_model` (a
    transformers causal LM whose decoder has `.layers` and `.norm`) is sharded in place; call it after the model
    has its final dtype and device, before the optimizer is built (the optimizer must hold the DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = apply_fsdp(raw_model, mesh, chunk_tokens=chunk_tokens, reduce_dtype=reduce_dtype, compile=compile)
    # Make the loss module FSDP's root now: otherwise the first forward pass to run (an evaluation, a probe on
    # the raw model) would make its own first sharded module the root, and training through the loss module
    # would then fail. Later forward passes may enter through any sharded module.
    model._get_fsdp_state()._lazy_init()
    return model


def apply_fsdp(raw_model: nn.Module, mesh, *, chunk_tokens: int, reduce_dtype: torch.dtype,
               compile: bool) -> nn.Module:
    """`fully_shard` on each decoder layer, the embedding, [final norm, lm_head] and CausalLMLoss(raw_model) over
    `mesh` (a 1-D DeviceMesh), in that order; returns the loss module. Works on a meta-device model too
    (benchmarks/fsdp_memory.py reads the shards' sizes)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = next(raw_model.parameters()).dtype
    policy = MixedPrecisionPolicy(reduce_dtype=None if reduce_dtype == param_dtype else reduce_dtype)
    decoder = raw_model.get_decoder()
    for layer in decoder.layers:
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(raw_model.get_input_embeddings(), mesh=mesh, mp_policy=policy)
    fully_shard([decoder.norm, raw_model.get_output_embeddings()], mesh=mesh, mp_policy=policy,
                reshard_after_forward=False)
    model = CausalLMLoss(raw_model, chunk_tokens)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered weights (after an evaluation: the norm + lm_head unit stays gathered after a
    forward pass, and until it is resharded its modules' `.weight` is the whole tensor, not the DTensor shard)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def micro_batch_context(model: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
    """What a micro-batch's forward/backward runs under: DDP's `no_sync` on all but the last micro-batch of an
    update (gradients accumulate locally, one all-reduce per update); nothing otherwise (one process, or FSDP,
    which reduce-scatters every micro-batch: module docstring)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm(parameters, max_norm: float, foreach: bool | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also works on DTensor gradients: the total norm of sharded gradients is
    a partial (per-shard) value until `full_tensor()` reduces it, and clipping each rank's shards by its local
    norm would clip the ranks differently. Returns the total norm before clipping (a plain 0-dim tensor, the same
    on every rank); clips only when max_norm > 0. On plain tensors exactly clip_grad_norm_ (the same two calls)."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0, False, foreach)
    if is_dtensor(total):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total
