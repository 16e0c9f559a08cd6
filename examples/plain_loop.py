"""AlphaDecay in a plain PyTorch loop: a short nanoGPT-style pretraining run of a small LLaMA on the shipped C4 sample.

    python examples/plain_loop.py                                  # AlphaDecay, 100 updates on CPU (~1 min)
    python examples/plain_loop.py --method adadecay --every 10     # any method of alphadecay.wd.available()

The loop, the optimizer and the weight-decay calls are plain torch and alphadecay.wd; the rows, the model and the
learning-rate schedule come from alphadecay's helpers, so this is the run `torchrun_main.py` makes with the same
flags (`--optimizer adamw --total_batch_size` = `--batch_size` ...): the same losses and per-module decays, which
tests/test_examples.py checks. `--out FILE` writes one JSON line per update; `--stop_after N --save FILE` and
`--resume FILE` stop and continue a run through the state dicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout; not needed after `pip install .`

import alphadecay.wd as wd  # noqa: E402
from alphadecay.data import DocumentStream, RowSpec, TokenBatches, list_shards, load_tokenizer  # noqa: E402
from alphadecay.model import build_model, load_model_config  # noqa: E402
from alphadecay.optim import lr_factor  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="alphadecay", choices=sorted(wd.available()))
    p.add_argument("--every", type=int, default=25, help="module-wise pass cadence (methods that take `every`)")
    p.add_argument("--model_config", default="configs/llama_3m.json")
    p.add_argument("--dataset", default="data/c4_sample")
    p.add_argument("--tokenizer", default="data/tokenizer")
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_seed", type=int, default=42)
    p.add_argument("--shuffle_buffer", type=int, default=1000)
    p.add_argument("--out", help="write one JSON line per update (loss, lr, weight-decay metrics) to this file")
    p.add_argument("--stop_after", type=int, help="stop after this many updates (with --save)")
    p.add_argument("--save", help="save model, optimizer, scheduler and data position here at the end")
    p.add_argument("--resume", help="continue from a file written by --save")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    tokenizer = load_tokenizer(args.tokenizer, args.max_length)
    rows = TokenBatches(DocumentStream(list_shards(args.dataset, "en", "train"), rank=0, world_size=1,
                                       seed=args.data_seed, buffer_size=args.shuffle_buffer),
                        tokenizer, RowSpec.from_tokenizer(tokenizer, args.max_length, packing=False), args.batch_size)
    model = build_model(load_model_config(args.model_config), seed=args.seed)

    # -- the library: per-module groups, a scheduler ------------------------------------------------------------
    optimizer = torch.optim.AdamW(wd.module_param_groups(model, weight_decay=args.weight_decay), lr=args.lr)
    options = {"every": args.every} if "every" in wd.METHODS[args.method].options else {}
    scheduler = wd.create(args.method, model, optimizer, **options)
    if args.resume:
        saved = torch.load(args.resume, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])  # its update count and the method's state
        rows.load_state_dict(saved["data"])

    records, batches = [], iter(rows)
    for update in range(scheduler.update, args.stop_after or args.updates):
        lr = args.lr * lr_factor(update, total_steps=args.updates, warmup_steps=args.warmup, schedule="cosine",
                                 min_lr_ratio=args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch, data_state = next(batches)
        logits = model(input_ids=batch["input_ids"]).logits.float()
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # the next token; pads are -100
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)  # token mean
        loss.backward()
        metrics = scheduler.step()  # once per update: after backward (and clipping), before optimizer.step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        records.append({"update": update, "loss": loss.item(), "lr": lr, **(metrics or {})})
        if metrics and "wd_multiplier_mean" in metrics:
            decays = scheduler.last_weight_decays().values()
            print(f"update {update}: {args.method} pass, decays {min(decays):.3g}..{max(decays):.3g}, mean multiplier "
                  f"{metrics['wd_multiplier_mean']:.3f}")
        if update % 10 == 0 or update == args.updates - 1:
            print(f"update {update}: loss {loss.item():.4f}, lr {lr:.2e}")

    if args.save:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "data": data_state}, args.save)
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return records


if __name__ == "__main__":
    main()
