"""Training throughput (tokens/s) of our update against a minimal baseline loop, measured in the same run.

    python benchmarks/throughput.py                       # llama_3m and llama_60m, CPU, float32, 8 x 256 tokens
    python benchmarks/throughput.py --configs 130m --device cuda --dtype bfloat16 --batch_size 64

Ours: `Trainer.train_step` (named per-module groups, token-weighted global loss, the weight-decay scheduler
hook, AdamW). Baseline: the plainest loop (HF loss, `loss.backward()`, one-group AdamW). Both see the same
random full rows (no padding), so tokens/s counts every position. The ratio ours/baseline shows what our loop
costs on top of the model itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphadecay import dist  # noqa: E402
from alphadecay.config import parse_args  # noqa: E402
from alphadecay.model import build_model, count_parameters, load_model_config  # noqa: E402
from alphadecay.optim import build_optimizer  # noqa: E402
from alphadecay.param_groups import build_param_groups  # noqa: E402
from alphadecay.trainer import Trainer  # noqa: E402
from baselines.uniform import Uniform  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(config_path: str, args, device: torch.device, dtype: torch.dtype) -> tuple[float, float, int]:
    model_config = load_model_config(config_path)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model_config.vocab_size, (args.batch_size, args.max_length), generator=gen)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}

    baseline_model = build_model(model_config, seed=0).to(device=device, dtype=dtype)
    baseline_opt = torch.optim.AdamW(baseline_model.parameters(), lr=1e-3, weight_decay=0.1,
                                     **({"fused": True} if device.type == "cuda" else {}))

    def baseline_step():
        loss = baseline_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        baseline_opt.step()
        baseline_opt.zero_grad(set_to_none=True)

    baseline = timed(baseline_step, args.steps, args.warmup, device)
    del baseline_model, baseline_opt

    config, _ = parse_args(["--optimizer", "adamw", "--weight_decay", "0.1", "--model_config", config_path])
    raw = build_model(model_config, seed=0).to(device=device, dtype=dtype)
    optimizer = build_optimizer(build_param_groups(raw, weight_decay=0.1), config, device)
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    trainer = Trainer.for_updates(config, info, raw, optimizer, Uniform())
    ours = timed(lambda: trainer.train_step(1, [batch]), args.steps, args.warmup, device)
    return baseline, ours, count_parameters(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="3m,60m", help="comma-separated sizes (configs/llama_<size>.json)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.dtype}, batch {args.batch_size} x {args.max_length} tokens, median of {args.steps} steps")
    print(f"{'config':<12} {'params':>8} {'baseline tok/s':>15} {'ours tok/s':>11} {'ours/baseline':>14}")
    tokens = args.batch_size * args.max_length
    for size in args.configs.split(","):
        baseline, ours, params = bench(f"configs/llama_{size}.json", args, device, dtype)
        print(f"llama_{size:<6} {params / 1e6:>7.1f}M {tokens / baseline:>15,.0f} {tokens / ours:>11,.0f} "
              f"{baseline / ours:>14.2f}")


if __name__ == "__main__":
    main()
