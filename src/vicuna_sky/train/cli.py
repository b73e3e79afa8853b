"""`torchrun ... -m vicuna_sky.train`: parse flags, train, exit with the trainer's status.

Exit 0 when done, PREEMPTED_EXIT_CODE (75) after an emergency checkpoint, 2 with one line for a
user error.
"""

from __future__ import annotations

import logging
import os
import sys

from vicuna_sky.errors import VicunaSkyError


def main(argv: list[str] | None = None) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "torch.distributed", "checkpoints_sync"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from vicuna_sky.train import dist
    from vicuna_sky.train.config import parse_args
    from vicuna_sky.train.trainer import Trainer

    try:
        code = Trainer(parse_args(argv)).run()
    except VicunaSkyError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        dist.close()
    sys.exit(code)
