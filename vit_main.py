"""Train a ViT (DeiT-tiny) on an ImageFolder dataset with a swappable weight-decay scheduler.

    python vit_main.py --model vit_tiny_patch4_32 --input_size 32 --data_path data/digits_sample ...
    torchrun --nproc_per_node=2 vit_main.py --model vit_deit_tiny_patch16_224 --data_path /data/imagenet ...  # DDP

The official ViT command lines run with `main.py` replaced by `vit_main.py` (and their --data_path).
`python vit_main.py --help` lists every flag. User errors (flags, files, sizes) are reported in one paragraph
with exit code 2 before any compute, and a save that cannot be written (a full disk) with exit code 1; see
README.md ("ViT on ImageNet").
"""

from __future__ import annotations

import sys

from alphadecay import dist
from alphadecay.errors import UserError
from alphadecay.vit.config import parse_vit_args


def main(argv: list[str] | None = None) -> int:
    try:
        config, _ = parse_vit_args(argv)
        info = dist.setup(config.device, timeout_minutes=config.dist_timeout)
        try:
            from alphadecay.vit.run import build_vit_trainer

            trainer = build_vit_trainer(config, info)
            try:
                trainer.evaluate_and_log() if config.eval else trainer.fit()
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
