"""The `fsdp` part of benchmarks/gpu_check.sh, one process per GPU under torchrun:

    torchrun --standalone --nproc_per_node=NGPU benchmarks/fsdp_check.py --config 1b --out result.json

On N ranks, for --parallelism fsdp and then ddp (the same model, AdamW on torch's kernel for the device — fused on
CUDA —, random full rows, Uniform decay): peak memory per rank and tokens/s of `Trainer.train_step` over --timed
updates after --warmup; for FSDP also one AlphaDecay spectral pass over the tuned Linears through the sharded route
(`alphadecay.esd.sharded`), its time and extra peak memory, and its alphas against `esd.module_metrics` of the same
weights made whole (`full_tensor()`); and a DCP checkpoint's save and load times. Rank 0 writes the results as
JSON. --cpu runs it on CPU with gloo (the smoke test's reduced form).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alphadecay import dist, esd, parallel, sharded_checkpoint  # noqa: E402
from alphadecay.checkpoint import tensor_bytes  # noqa: E402
from alphadecay.config import parse_args  # noqa: E402
from alphadecay.esd import sharded  # noqa: E402
from alphadecay.model import build_model, cast_model, load_model_config  # noqa: E402
from alphadecay.optim import build_optimizer  # noqa: E402
from alphadecay.run import wrap_model  # noqa: E402
from alphadecay.trainer import Trainer  # noqa: E402
from alphadecay.wd.groups import linear_modules, module_param_groups  # noqa: E402
from esd_pass import max_rel_alpha_diff  # noqa: E402 - benchmarks/, the script's directory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure(parallelism: str, args: argparse.Namespace, info: dist.DistInfo, dtype: torch.dtype) -> dict:
    device = info.device
    config, _ = parse_args(["--model_config", str(REPO / "configs" / f"llama_{args.config}.json"), "--optimizer",
                            "adamw", "--weight_decay", "0.1", "--max_length", str(args.max_length),
                            "--parallelism", parallelism])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    raw = build_model(load_model_config(config.model_config), seed=0, device=device)  # built on the device
    cast_model(raw, device, dtype)
    if parallelism == "fsdp":
        model = parallel.fully_shard_llama(raw, device, chunk_tokens=0, reduce_dtype=dtype, compile=False)
    else:
        model = wrap_model(raw, config, info, compile=False)
    optimizer = build_optimizer(module_param_groups(raw, 0.1), config, device)
    trainer = Trainer.for_updates(config, info, model, optimizer, raw_model=raw)
    gen = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(3, raw.config.vocab_size, (args.micro, args.max_length), generator=gen).to(device)
    batch = [{"input_ids": ids, "labels": ids}]
    for _ in range(args.warmup):
        trainer.train_step(batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.timed):
        trainer.train_step(batch)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"parallelism": parallelism, "ranks": info.world_size, "peak_bytes": peak(device),
           "tokens_per_s": info.world_size * args.timed * ids.numel() / seconds,
           "state_bytes": 4 * tensor_bytes(list(raw.parameters())) / (
               info.world_size if parallelism == "fsdp" else 1)}
    if parallelism == "fsdp":
        out.update(spectral_pass(raw, device))
        out.update(checkpoint_round_trip(raw, optimizer, device))
    del raw, model, optimizer, trainer
    return out


def spectral_pass(raw: torch.nn.Module, device: torch.device) -> dict:
    """One pass over the tuned Linears (all but the first and the last): sharded route vs the whole weights."""
    tuned = [(n, m.weight.detach()) for n, m in linear_modules(raw)][1:-1]
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    got = sharded.module_metrics(tuned)
    sync(device)
    seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else None
    whole = [(n, w.full_tensor()) for n, w in tuned]  # every matrix on every rank: the reference only
    want = esd.module_metrics(whole)
    return {"esd_seconds": seconds, "esd_extra_peak_bytes": extra, "esd_modules": len(tuned),
            "esd_max_rel_alpha_diff": max_rel_alpha_diff(got, want)}


def checkpoint_round_trip(raw: torch.nn.Module, optimizer, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(prefix="fsdp_check-") as tmp:
        tmp = dist.broadcast_object(tmp)  # one directory: the ranks share a filesystem on one machine
        sync(device)
        start = time.perf_counter()
        path = sharded_checkpoint.save(tmp, 1, raw, optimizer, {"step": 1}, full_model=False)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        sharded_checkpoint.load(path, raw, optimizer)
        sync(device)
        loaded = time.perf_counter() - start
        dist.barrier()
    return {"dcp_save_seconds": saved, "dcp_load_seconds": loaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="1b")
    parser.add_argument("--micro", type=int, default=8, help="rows per rank per update")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="float32 on CPU with gloo (the smoke test)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    info = dist.setup("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    try:
        results = [measure("fsdp", args, info, dtype), measure("ddp", args, info, dtype)]
        if info.is_main:
            Path(args.out).write_text(json.dumps({"config": args.config, "micro": args.micro,
                                                  "max_length": args.max_length, "dtype": str(dtype),
                                                  "results": results}, indent=1))
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
