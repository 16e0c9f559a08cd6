"""Training throughput (tokens/s) of our update against a minimal baseline loop, eager and compiled, same run.

    python benchmarks/throughput.py                       # llama_3m and llama_60m, CPU, float32, 8 x 256 tokens
    python benchmarks/throughput.py --configs 3m --modes eager --loss_chunk_tokens 512
    python benchmarks/throughput.py --configs 130m --device cuda --dtype bfloat16 --batch_size 64

Ours: `Trainer.train_step` (named per-module groups, token-weighted global loss through CausalLMLoss, the
weight-decay scheduler hook, AdamW), eager and, with `--modes eager,compiled` (the default), torch.compile'd as
`--compile true` does it (the first, untimed warm-up steps include the compilation). Baseline: the plainest loop
(HF loss, `loss.backward()`, one-group AdamW, eager). All see the same random full rows (no padding), so tokens/s
counts every position. The steps of the variants alternate (one step of each per round), so a change of load on
the machine hits all of them alike; medians are reported. ours/baseline shows what our loop costs on top of the
model itself (it should be >= 1 within noise); compiled/eager what torch.compile gives.
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
from alphadecay.run import wrap_model  # noqa: E402
from alphadecay.trainer import Trainer  # noqa: E402
from alphadecay.wd.groups import module_param_groups  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternating(step_fns: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each function, after `warmup` untimed steps each; the timed steps alternate, and
    each round starts with the next function, so none always runs right after the same one."""
    for fn in step_fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    names = list(step_fns)
    for round_ in range(steps):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn = step_fns[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(config_path: str, args, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, float], int]:
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

    config, _ = parse_args(["--optimizer", "adamw", "--weight_decay", "0.1", "--model_config", config_path,
                            "--loss_chunk_tokens", str(args.loss_chunk_tokens)])
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    step_fns = {"baseline": baseline_step}
    for mode in args.modes.split(","):
        raw = build_model(model_config, seed=0).to(device=device, dtype=dtype)
        optimizer = build_optimizer(module_param_groups(raw, 0.1), config, device)
        model = wrap_model(raw, config, info, compile=mode == "compiled")
        trainer = Trainer.for_updates(config, info, model, optimizer, raw_model=raw)
        step_fns[mode] = lambda trainer=trainer: trainer.train_step([batch])
    return alternating(step_fns, args.steps, args.warmup, device), count_parameters(baseline_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="3m,60m", help="comma-separated sizes (configs/llama_<size>.json)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default="eager,compiled", help="our update's variants: eager and/or compiled")
    parser.add_argument("--loss_chunk_tokens", type=int, default=0, help="ours: --loss_chunk_tokens")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compiled"}:
        parser.error(f"--modes: eager and/or compiled, got {args.modes!r}")
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.dtype}, batch {args.batch_size} x {args.max_length} tokens, loss chunk {args.loss_chunk_tokens}, "
          f"median of {args.steps} alternating steps after {args.warmup} warm-up steps")
    header = f"{'config':<12} {'params':>8} {'baseline tok/s':>15}"
    header += "".join(f" {f'ours {m} tok/s':>20} {f'{m}/baseline':>18}" for m in modes)
    print(header + (f" {'compiled/eager':>15}" if len(modes) == 2 else ""))
    tokens = args.batch_size * args.max_length
    for size in args.configs.split(","):
        seconds, params = bench(f"configs/llama_{size}.json", args, device, dtype)
        row = f"llama_{size:<6} {params / 1e6:>7.1f}M {tokens / seconds['baseline']:>15,.0f}"
        row += "".join(f" {tokens / seconds[m]:>20,.0f} {seconds['baseline'] / seconds[m]:>18.2f}" for m in modes)
        print(row + (f" {seconds['eager'] / seconds['compiled']:>15.2f}" if len(modes) == 2 else ""))


if __name__ == "__main__":
    main()
