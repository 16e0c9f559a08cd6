"""Pretrain LLaMA on C4 with a swappable weight-decay scheduler.

    python torchrun_main.py --model_config configs/llama_3m.json --dataset data/c4_sample --tokenizer data/tokenizer ...
    torchrun --nproc_per_node=2 torchrun_main.py --model_config configs/llama_130m.json ...   # DDP (NCCL or gloo)

`python torchrun_main.py --help` lists every flag. User errors (flags, files, sizes) are reported in one
paragraph with exit code 2 before any compute; a run stopped by its environment (a save that cannot be written:
exit code 1; a hub down past --hub_retry_seconds: 75) in one paragraph saying what was kept; see README.md.
"""

from __future__ import annotations

import sys

from alphadecay import dist
from alphadecay.config import parse_args
from alphadecay.errors import UserError


def main(argv: list[str] | None = None) -> int:
    try:
        config, _ = parse_args(argv)
        info = dist.setup(config.device, timeout_minutes=config.dist_timeout)
        try:
            from alphadecay.run import build_trainer

            trainer = build_trainer(config, info)
            try:
                trainer.fit()
            finally:
                trainer.logger.close()
        finally:
            dist.teardown()
    except UserError as err:  # and its RunFault subclasses: one paragraph, no traceback
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
