"""Memory per rank of the training state, DDP vs FSDP, for the 1B / 3B / 7B configs: counted from the tensors each
rank would hold, printed against the formula.

    python benchmarks/fsdp_memory.py                                 # llama_1b, 3b, 7b at 2, 8 and 64 ranks
    python benchmarks/fsdp_memory.py --configs 7b --ranks 4,16 --dtype float32

Nothing is allocated: each model is built on the meta device (shapes only) and sharded by the training code's own
`alphadecay.parallel.apply_fsdp` over a fake process group of N ranks (torch's `fake` backend, from
torch.testing: it has a rank and a world size and communicates nothing). What rank 0 holds is then read off its
DTensors' local shards (rank 0 has the largest: rows are split ⌈out/N⌉ per rank, so its shards are the padded
ones).

The training state in the paper's pure bf16 is, per parameter, the weight (2 B), its gradient (2 B) and Adam's two
moments (2 × 2 B): 8 B, all in the parameters' dtype (--dtype bfloat16; float32 doubles it).
- DDP replicates all of it on every rank: 8·P bytes (the formula), counted as the sum of the parameters' bytes × 4.
- FSDP shards all of it: the formula 8·P/N; counted: rank 0's local shards' bytes × 4 (padding makes it a little
  more). While a layer computes, its weights are gathered whole, and in its backward pass its whole gradients
  too: "+ transient" is the largest FSDP unit's (a decoder layer, or the embedding, or norm + lm_head) unsharded
  weights + gradients, which come on top for the length of that unit's computation (torch prefetches the next
  unit's weights, so up to about one more unit's weights).
Activations, the logits and the allocator's caching are not counted: they depend on the micro-batch, not on the
parallelism (--activation_checkpointing and --loss_chunk_tokens reduce them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alphadecay.checkpoint import tensor_bytes  # noqa: E402
from alphadecay.model import build_model, load_model_config  # noqa: E402
from alphadecay.parallel import apply_fsdp  # noqa: E402

STATE_COPIES = 4  # weight, gradient, Adam m, Adam v: each the size of the parameters, in their dtype
GB = 1e9


def meta_model(size: str, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(load_model_config(str(REPO / "configs" / f"llama_{size}.json")), seed=0)
    return model.to(dtype)


def sharded_bytes(size: str, dtype: torch.dtype, ranks: int) -> tuple[int, int]:
    """(rank 0's sharded parameter bytes, the largest FSDP unit's unsharded bytes) with `ranks` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        model = meta_model(size, dtype)
        apply_fsdp(model, init_device_mesh("cpu", (ranks,)), chunk_tokens=0, reduce_dtype=dtype, compile=False)
        local = tensor_bytes([p.to_local() for p in model.parameters()])
        decoder = model.get_decoder()
        units = [list(layer.parameters()) for layer in decoder.layers]
        units += [list(model.get_input_embeddings().parameters()),
                  list(decoder.norm.parameters()) + list(model.get_output_embeddings().parameters())]
        largest = max(tensor_bytes(units_params) for units_params in units)  # DTensor numel: the whole tensor's
    finally:
        dist.destroy_process_group()
    return local, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1b,3b,7b", help="configs/llama_<size>.json sizes, comma-separated")
    parser.add_argument("--ranks", default="2,8,64", help="world sizes, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    width = torch.tensor([], dtype=dtype).element_size()
    print(f"training state per rank (weights + gradients + Adam m, v in {args.dtype}: {STATE_COPIES * width} B per "
          f"parameter), GB = 1e9 bytes; counted from rank 0's tensors of a meta-device model")
    print(f"| config | params | ranks | DDP counted | DDP formula {STATE_COPIES * width}·P | FSDP counted | "
          f"FSDP formula {STATE_COPIES * width}·P/N | counted / formula | + transient (largest unit whole) |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for size in args.configs.split(","):
        model = meta_model(size, dtype)
        params = sum(p.numel() for p in model.parameters())
        ddp = STATE_COPIES * tensor_bytes(list(model.parameters()))
        for ranks in (int(r) for r in args.ranks.split(",")):
            local, largest = sharded_bytes(size, dtype, ranks)
            fsdp, formula = STATE_COPIES * local, STATE_COPIES * width * params / ranks
            worst = max(worst, fsdp / formula)
            print(f"| {size} | {params / 1e9:.2f}B | {ranks} | {ddp / GB:.2f} | "
                  f"{STATE_COPIES * width * params / GB:.2f} | {fsdp / GB:.3f} | {formula / GB:.3f} | "
                  f"{fsdp / formula:.4f} | {2 * largest / GB:.3f} |")
    print(f"\nFSDP's counted state is at most {worst:.4f}x the formula (rank 0's padded shards); DDP's equals it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
