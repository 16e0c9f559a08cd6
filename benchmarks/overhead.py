"""What an AlphaDecay pass costs a training run: AlphaDecay vs Uniform over the same updates, same run; and the
Hugging Face Trainer with alphadecay.integrations.hf.WeightDecayCallback against the same Trainer without it.

    python benchmarks/overhead.py                                  # llama_60m, CPU, float32, 8 x 256 tokens
    python benchmarks/overhead.py --config 130m --device cuda --dtype bfloat16 --batch_size 128
    python benchmarks/overhead.py --part hf --config 3m            # only the Trainer comparison

Both trainers do the same updates on the same random rows from the same initial weights, their updates
alternating (so load changes on the machine hit both alike); AlphaDecay recomputes its decays at update 0 and
every --every updates. Prints the time per update, the overhead per pass (AlphaDecay minus Uniform on the pass
updates), the same difference on the other updates (the noise floor), the pass measured on its own, and the
larger of the two overheads as a share of training at the paper's cadence of one pass per 500 updates.

The Trainer part (`--part hf`, or both by default) runs `transformers.Trainer.train()` on the same rows, model and
per-module AdamW groups twice with the callback (AlphaDecay, a pass at update 0 and every --every updates) and twice
without, alternating, and prints the ratio of their summed train_runtime: what the callback costs in the Trainer, the
passes included (each run's first update includes the Trainer's start-up, alike on both sides).
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
from alphadecay.trainer import Trainer  # noqa: E402
from alphadecay.wd.groups import module_param_groups  # noqa: E402
from alphadecay.wd.scheduler import from_flags  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_trainer(method: str, args, device: torch.device, dtype: torch.dtype) -> Trainer:
    config, _ = parse_args(["--model_config", f"configs/llama_{args.config}.json", "--optimizer", "adamw",
                            "--weight_decay", "0.1", "--wd_scheduler", method, "--unbalancedWD_every", str(args.every),
                            "--wd_max_ratio", "5", "--wd_min_ratio", "0.6666"])
    model = build_model(load_model_config(config.model_config), seed=0).to(device=device, dtype=dtype)
    optimizer = build_optimizer(module_param_groups(model, 0.1), config, device)
    scheduler = from_flags(config, model, optimizer)
    return Trainer.for_updates(config, dist.DistInfo(0, 0, 1, device), model, optimizer, scheduler)


def timed_step(trainer: Trainer, batch: dict, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    trainer.train_step([batch])
    sync(device)
    return time.perf_counter() - start


def interleaved(args, device: torch.device, dtype: torch.dtype, batches: list[dict]) -> tuple[list[float], list[float]]:
    """Per-update seconds of Uniform and AlphaDecay, their updates alternating so machine drift hits both alike."""
    uniform, alpha = (make_trainer(m, args, device, dtype) for m in ("uniform", "alphadecay"))
    for trainer in (uniform, alpha):
        trainer.train_step([batches[0]])  # warm-up (update 0: AlphaDecay's pass at initialisation)
    times_u, times_a = [], []
    for batch in batches:  # updates 1, 2, ...: a pass whenever (update + 1) % every == 0
        times_u.append(timed_step(uniform, batch, device))
        times_a.append(timed_step(alpha, batch, device))
    return times_u, times_a


def pass_alone(args, device: torch.device, dtype: torch.dtype) -> float:
    """Median seconds of ModulewiseDecay.step at a pass step, outside training."""
    config, _ = parse_args(["--model_config", f"configs/llama_{args.config}.json", "--wd_scheduler", "alphadecay"])
    model = build_model(load_model_config(config.model_config), seed=0).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
    scheduler = from_flags(config, model, optimizer)
    times = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        scheduler.rule.step(0, model)  # the pass alone, without applying its decays
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def hf_trainer_runs(args, device: torch.device, dtype: torch.dtype, batches: list[dict]) -> tuple[float, float]:
    """Summed train_runtime (s) of the Trainer without and with WeightDecayCallback("alphadecay"), alternating."""
    import os
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from alphadecay.integrations.hf import WeightDecayCallback

    hf_logging.set_verbosity_error()
    rows = [{"input_ids": ids, "labels": ids} for batch in batches for ids in batch["input_ids"].cpu()]

    def run(with_callback: bool) -> float:
        model = build_model(load_model_config(f"configs/llama_{args.config}.json"), seed=0)
        model = model.to(device=device, dtype=dtype)
        optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
        callbacks = [WeightDecayCallback("alphadecay", every=args.every, max_ratio=5.0)] if with_callback else []
        with tempfile.TemporaryDirectory() as out:
            training = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=len(batches),
                                         per_device_train_batch_size=args.batch_size, report_to="none",
                                         use_cpu=device.type == "cpu", save_strategy="no", logging_steps=10**6,
                                         disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0)
            trainer = Trainer(model=model, args=training, train_dataset=rows, optimizers=(optimizer, None),
                              callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # the pass metrics are the log; not printed here
            return trainer.train().metrics["train_runtime"]

    without, with_ = 0.0, 0.0
    for _ in range(args.hf_rounds):
        without += run(False)
        with_ += run(True)
    return without, with_


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
    parser.add_argument("--part", default="both", choices=("trainer", "hf", "both"),
                        help="our trainer (AlphaDecay vs Uniform), the Hugging Face Trainer (with vs without the "
                             "callback), or both")
    parser.add_argument("--hf_rounds", type=int, default=2, help="Trainer runs per side, alternating")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vocab = load_model_config(f"configs/llama_{args.config}.json").vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.updates):
        ids = torch.randint(3, vocab, (args.batch_size, args.max_length), generator=gen).to(device)
        batches.append({"input_ids": ids, "labels": ids})

    if args.part in ("trainer", "both"):
        report_trainer(args, device, dtype, batches)
    if args.part in ("hf", "both"):
        without, with_ = hf_trainer_runs(args, device, dtype, batches)
        print(f"Hugging Face Trainer, {args.hf_rounds} x {args.updates} updates per side, alternating: without the "
              f"callback {without:.2f} s, with WeightDecayCallback('alphadecay') {with_:.2f} s (passes at updates "
              f"{pass_updates(args)}): ratio with/without {with_ / without:.3f}")


def pass_updates(args) -> list[int]:
    """The updates at which AlphaDecay passes (the official LLaMA timing: the first, then every --every)."""
    return [s for s in range(args.updates) if s == 0 or (s + 1) % args.every == 0]


def report_trainer(args, device: torch.device, dtype: torch.dtype, batches: list[dict]) -> None:
    times_u, times_a = interleaved(args, device, dtype, batches)
    alone = pass_alone(args, device, dtype)
    passes = pass_updates(args)
    others = [s for s in range(args.updates) if s not in passes]
    per_update = sum(times_u) / args.updates
    per_pass = sum(times_a[s] - times_u[s] for s in passes) / len(passes)
    drift = sum(times_a[s] - times_u[s] for s in others) / max(1, len(others))
    print(f"llama_{args.config} on {device} ({args.dtype}), batch {args.batch_size} x {args.max_length}, "
          f"{args.updates} updates each, alternating; AlphaDecay passes at updates {passes}")
    print(f"uniform     {sum(times_u):8.2f} s  ({per_update:.3f} s/update)")
    print(f"alphadecay  {sum(times_a):8.2f} s  (ratio alphadecay/uniform {sum(times_a) / sum(times_u):.3f})")
    print(f"overhead per pass {per_pass:.3f} s in training (alphadecay - uniform on pass updates; on the other "
          f"updates the difference is {drift:+.3f} s, the noise floor), {alone:.3f} s measured alone")
    share = max(per_pass, alone) / (args.paper_every * per_update)
    print(f"share of training at one pass per {args.paper_every} updates: {100 * share:.3f}% (target < 0.5%)")


if __name__ == "__main__":
    main()
