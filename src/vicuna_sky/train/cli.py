"""`torchrun ... -m vicuna_sky.train`: parse flags, train, exit with the trainer's status.

Exit 0 when done, PREEMPTED_EXIT_CODE (75) after an emergency checkpoint, 2 with one line for a
user error or the GPUs out of memory (and the NOT_RETRYABLE marker, so the job is not restarted
for it).
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
        # Our errors are about the inputs (data, model, settings): a new machine would hit them
        # again.
        code = not_retryable(config, str(e).splitlines()[0])
    except Exception as e:
        import torch

        if not isinstance(e, torch.OutOfMemoryError):
            raise
        # The same settings run out of memory on every machine of the same GPU type: a
        # relaunch would only buy another cluster in another region to fail on.
        code = not_retryable(config, out_of_memory(config))
    finally:
        dist.close()
    sys.exit(code)


def not_retryable(config: object, reason: str) -> int:
    """Say `reason` in one line and leave the marker the run script ends the job on instead of
    restarting it; the exit status (2)."""
    print(f"error: {reason}", file=sys.stderr)
    directory = Path(config.checkpoint_dir if config else "checkpoints")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / NOT_RETRYABLE).write_text(reason + "\n")
    return 2


def out_of_memory(config: object) -> str:
    """What to change when the GPUs ran out of memory, naming the recipe's own settings."""
    said = "out of GPU memory: lower train.micro_batch_size"
    if config is None:
        return said + ", or use GPUs with more memory"
    said += f" (now {config.micro_batch_size})"
    if not config.gradient_checkpointing:
        said += ", turn train.gradient_checkpointing on"
    return said + ", or use more GPUs (resources.gpus_per_node, nodes) or larger ones"


NOT_RETRYABLE = "NOT_RETRYABLE"
"""The marker a failure a restart cannot fix leaves in the checkpoint directory (sky/train.yaml
reads it)."""
