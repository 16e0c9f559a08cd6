"""AlphaDecay in the Hugging Face Trainer: a tiny GPT-2 on the shipped C4 sample, with WeightDecayCallback.

    python examples/hf_trainer.py                                    # 30 updates, gradient accumulation 2, CPU
    python examples/hf_trainer.py --method adadecay --every 10 --factory
    python examples/hf_trainer.py --max_steps 60 --resume runs/hf_example/checkpoint-30

The Trainer gets per-module optimizer groups (alphadecay.wd.module_param_groups: one group per Conv1D, so each can
have its own decay), either as a ready optimizer (`optimizers=(torch.optim.AdamW(...), None)`, the default here) or
through `optimizer_cls_and_kwargs=module_groups_optimizer(...)` (`--factory`). The callback runs the method once per
optimizer update, after clipping and before the step; its pass metrics (`alpha/<module>`, `wd/<module>`, ...) are in
the Trainer's log (`trainer.state.log_history`, trainer_state.json). Checkpoints every --save_steps updates resume
with `--resume DIR` to the same losses and decays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout; not needed after `pip install .`

import alphadecay.wd as wd  # noqa: E402
from alphadecay.data import (DocumentStream, RowSpec, encode_documents, labels_for, list_shards,  # noqa: E402
                             load_tokenizer, pad_rows)
from alphadecay.integrations.hf import WeightDecayCallback, module_groups_optimizer  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="alphadecay", choices=sorted(wd.available()))
    p.add_argument("--every", type=int, default=5, help="module-wise pass cadence (methods that take `every`)")
    p.add_argument("--dataset", default="data/c4_sample")
    p.add_argument("--tokenizer", default="data/tokenizer")
    p.add_argument("--rows", type=int, default=240, help="training rows: the split's first documents")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--save_steps", type=int, default=10)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--output_dir", default="runs/hf_example")
    p.add_argument("--factory", action="store_true",
                   help="let the Trainer build the optimizer (optimizer_cls_and_kwargs)")
    p.add_argument("--resume", help="a checkpoint-<step> directory of --output_dir to continue from")
    return p.parse_args(argv)


def training_rows(args: argparse.Namespace, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The first --rows documents of the train split, one right-padded row each (pads ignored by the loss)."""
    spec = RowSpec.from_tokenizer(tokenizer, args.max_length, packing=False)
    stream = DocumentStream(list_shards(args.dataset, "en", "train"), rank=0, world_size=1, seed=0, buffer_size=1,
                            shuffle=False, repeat=False)
    texts = [text for _, text in zip(range(args.rows), stream)]
    input_ids = pad_rows(encode_documents(tokenizer, texts, spec), spec)
    labels = labels_for(input_ids, spec)
    return [{"input_ids": i, "labels": t} for i, t in zip(input_ids, labels)]


def build_trainer(args: argparse.Namespace, callbacks: list | None = None) -> Trainer:
    tokenizer = load_tokenizer(args.tokenizer, args.max_length)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=args.max_length, n_embd=64, n_layer=2,
                                       n_head=2, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=2, logging_steps=args.logging_steps, save_steps=args.save_steps, report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    # per-module groups: each Conv1D its own, so each can get its own decay
    if args.factory:
        optimizer = {"optimizer_cls_and_kwargs": module_groups_optimizer(torch.optim.AdamW, lr=args.lr,
                                                                         weight_decay=args.weight_decay)}
    else:
        groups = wd.module_param_groups(model, weight_decay=args.weight_decay)
        optimizer = {"optimizers": (torch.optim.AdamW(groups, lr=args.lr), None)}
    options = {"every": args.every} if "every" in wd.METHODS[args.method].options else {}
    callback = WeightDecayCallback(args.method, **options)
    return Trainer(model=model, args=training, train_dataset=training_rows(args, tokenizer),
                   callbacks=[callback, *(callbacks or [])], **optimizer)


def main(argv: list[str] | None = None) -> Trainer:
    args = parse(argv)
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume)
    for record in trainer.state.log_history:
        if "loss" in record:
            decays = [v for k, v in record.items() if k.startswith("wd/")]
            spread = (f", {args.method} pass: decays {min(decays):.3g}..{max(decays):.3g}, mean multiplier "
                      f"{record['wd_multiplier_mean']:.3f}" if decays else "")
            print(f"update {record['step']}: loss {record['loss']:.4f}{spread}")
    return trainer


if __name__ == "__main__":
    main()
