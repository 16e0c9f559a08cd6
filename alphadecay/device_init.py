"""Build a model straight on its device, with the values a CPU build gives, bit for bit.

A model built on the host holds all its float32 weights there before it moves to the GPU: 5.4 GB for llama_1b, on
every rank (8 ranks: 43 GB of a node's memory). Built under `built_on(device)`, each parameter lives on the device
from the moment its module registers it, and the host only ever holds the one tensor an init operation is working on.

Exactness: the initial values must not depend on where the model was built (the CPU runs compare exactly, a resumed
run continues exactly, and one process equals two). A GPU's random numbers and its arithmetic (erfinv in a truncated
normal, pow) differ from the CPU's, so every operation that reads or writes a parameter during construction runs on
a host copy of it, with the CPU kernel, the CPU generator and the same strides (contiguity decides how many numbers
the CPU generator draws), and the result is copied back. The random stream is consumed in the same order and amount
as in a host build, so the parameters, the generator's state afterwards and everything seeded after them are the
same. Buffers stay on the host, computed there as before (`cast_model` or `.to()` moves them afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# In-place operations whose result does not depend on the values they overwrite: no copy to the host first.
OVERWRITES = {aten.normal_.default, aten.uniform_.default, aten.zero_.default, aten.fill_.Scalar}


class HostCompute(TorchDispatchMode):
    """Runs each operation that touches a tensor of `device`'s type on host copies of its tensors, writes the
    arguments it mutates back, and returns its results on the device. View operations run as they are, so a view of
    a device tensor (`weight[padding_idx]`) stays a view of it. `ops` counts the operations run on the host.

    With device cpu (tests), every operation on a CPU tensor runs on a copy of it: the values must not change."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device_type = torch.device(device).type
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if (any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)  # a view
                or not any(isinstance(t, torch.Tensor) and t.device.type == self.device_type
                           for t in pytree.arg_tree_leaves(*args, **kwargs))):
            return func(*args, **kwargs)
        self.ops += 1
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(device tensor) -> (device tensor, host copy)

        def to_host(t):
            if not (isinstance(t, torch.Tensor) and t.device.type == self.device_type):
                return t
            if id(t) not in copies:
                host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                # A meta tensor has no values; an overwritten one needs none: their host copies stay uninitialised.
                if t.device.type != "meta" and not (func in OVERWRITES and args and t is args[0]):
                    host.copy_(t)
                copies[id(t)] = (t, host)
            return copies[id(t)][1]

        host_args, host_kwargs = pytree.tree_map(to_host, (args, kwargs))
        out = func(*host_args, **host_kwargs)
        written = [kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
                   for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        for target in pytree.tree_leaves(written):
            if isinstance(target, torch.Tensor) and id(target) in copies:
                target.copy_(copies[id(target)][1])
        if kwargs.get("device") is not None:  # the operation names its result's device (e.g. .to("cpu"))
            return out
        by_host = {id(host): t for t, host in copies.values()}
        device = next(iter(copies.values()))[0].device  # where the operation's tensors live

        def to_device(o):
            if not isinstance(o, torch.Tensor):
                return o
            return by_host[id(o)] if id(o) in by_host else o.to(device)

        return pytree.tree_map(to_device, out)


@contextlib.contextmanager
def built_on(device: torch.device | str) -> Iterator[None]:
    """Modules constructed inside hold their parameters on `device` with the values (and leave the CPU generator in
    the state) that construction on the CPU would; a no-op for the CPU. Buffers stay on the host."""
    device = torch.device(device)
    if device.type == "cpu":
        yield
        return

    def to_device(module: torch.nn.Module, name: str, param: torch.nn.Parameter):
        if param is None or param.device.type != "cpu":
            return None
        moved = torch.nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
        moved.__dict__.update(param.__dict__)
        return moved

    handle = register_module_parameter_registration_hook(to_device)
    try:
        with HostCompute(device):
            yield
    finally:
        handle.remove()
