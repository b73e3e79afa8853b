"""`torchrun ... -m vicuna_sky.train`: parse flags, train, exit with the trainer's status.

Exit 0 when done, PREEMPTED_EXIT_CODE (75) after an emergency checkpoint, 2 with one line for a
user error (and the NOT_RETRYABLE marker, so the job is not restarted for it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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

    config = None
    try:
        config = parse_args(argv)
        code = Trainer(config).run()
    except VicunaSkyError as e:
        print(f"error: {e}", file=sys.stderr)
        # The run script ends the job on this marker instead of restarting it: our errors are
        # about the inputs (data, model, settings), and a new machine would hit them again.
        directory = Path(config.checkpoint_dir if config else "checkpoints")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / NOT_RETRYABLE).write_text(str(e).splitlines()[0] + "\n")
        code = 2
    finally:
        dist.close()
    sys.exit(code)


NOT_RETRYABLE = "NOT_RETRYABLE"
"""The marker a failure a restart cannot fix leaves in the checkpoint directory (sky/train.yaml
reads it)."""
