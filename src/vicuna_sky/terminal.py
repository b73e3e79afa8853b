"""The consoles commands print through. A terminal gets its own width; a pipe, a file or a job's
log gets a wide one, so tables and long lines come out whole instead of cut or folded at rich's
default of 80 columns (COLUMNS, when set, wins either way)."""

from __future__ import annotations

import os

from rich.console import Console

PIPE_WIDTH = 200


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, width=PIPE_WIDTH)
