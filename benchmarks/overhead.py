"""What an AlphaDecay pass costs a training run: AlphaDecay vs Uniform over the same updates, same run.

    python benchmarks/overhead.py                                  # llama_60m, CPU, float32, 8 x 256 tokens
    python benchmarks/overhead.py --config 130m --device cuda --dtype bfloat16 --batch_size 128

Both runs do the same updates on the same random rows from the same initial weights; AlphaDecay recomputes
its decays every --every updates (plus update 0, as in training). Prints the time per update, the overhead per
pass (AlphaDecay total - Uniform total, divided by the number of passes), the pass measured on its own, and the
overhead as a share of training at the paper's cadence of one pass per 500 updates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphadecay import dist  # noqa: E402
from alphadecay.config import parse_args  # noqa: E402
from alphadecay.model import build_model, load_model_config  # noqa: E402
from alphadecay.optim import build_optimizer  # noqa: E402
from alphadecay.param_groups import build_param_groups  # noqa: E402
from alphadecay.schedulers import build_wd_scheduler  # noqa: E402
from alphadecay.trainer import Trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(method: str, args, device: torch.device, dtype: torch.dtype, batches: list[dict]) -> tuple[float, int]:
    """Seconds for len(batches) updates with `method`, and the number of module-wise passes among them."""
    config, _ = parse_args(["--model_config", f"configs/llama_{args.config}.json", "--optimizer", "adamw",
                            "--weight_decay", "0.1", "--wd_scheduler", method, "--unbalancedWD_every", str(args.every),
                            "--wd_max_ratio", "5", "--wd_min_ratio", "0.6666"])
    model = build_model(load_model_config(config.model_config), seed=0).to(device=device, dtype=dtype)
    optimizer = build_optimizer(build_param_groups(model, weight_decay=0.1), config, device)
    scheduler = build_wd_scheduler(config, model, optimizer.param_groups)
    trainer = Trainer.for_updates(config, dist.DistInfo(0, 0, 1, device), model, optimizer, scheduler)
    trainer.train_step(args.every, [batches[0]])  # warm-up (not a pass step)
    sync(device)
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        trainer.train_step(step, [batch])
    sync(device)
    passes = sum(1 for s in range(len(batches)) if s == 0 or (s + 1) % args.every == 0) if method != "uniform" else 0
    return time.perf_counter() - start, passes


def pass_alone(args, device: torch.device, dtype: torch.dtype) -> float:
    """Median seconds of ModulewiseDecay.step at a pass step, outside training."""
    config, _ = parse_args(["--model_config", f"configs/llama_{args.config}.json", "--wd_scheduler", "alphadecay"])
    model = build_model(load_model_config(config.model_config), seed=0).to(device=device, dtype=dtype)
    scheduler = build_wd_scheduler(config, model, build_param_groups(model, weight_decay=0.1))
    times = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        scheduler.step(0, model)
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="60m", help="configs/llama_<config>.json")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="pass cadence inside this benchmark")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--paper_every", type=int, default=500, help="the cadence the share is reported at")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vocab = load_model_config(f"configs/llama_{args.config}.json").vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.updates):
        ids = torch.randint(3, vocab, (args.batch_size, args.max_length), generator=gen).to(device)
        batches.append({"input_ids": ids, "labels": ids})

    uniform, _ = run("uniform", args, device, dtype, batches)
    alpha, passes = run("alphadecay", args, device, dtype, batches)
    alone = pass_alone(args, device, dtype)
    per_update = uniform / args.updates
    per_pass = (alpha - uniform) / passes
    print(f"llama_{args.config} on {device} ({args.dtype}), batch {args.batch_size} x {args.max_length}, "
          f"{args.updates} updates, a pass at update 0 and every {args.every} ({passes} passes)")
    print(f"uniform     {uniform:8.2f} s  ({per_update:.3f} s/update)")
    print(f"alphadecay  {alpha:8.2f} s  (ratio alphadecay/uniform {alpha / uniform:.3f})")
    print(f"overhead per pass {per_pass:.3f} s in training, {alone:.3f} s measured alone")
    share = max(per_pass, alone) / (args.paper_every * per_update)
    print(f"share of training at one pass per {args.paper_every} updates: {100 * share:.3f}% (target < 0.5%)")


if __name__ == "__main__":
    main()
