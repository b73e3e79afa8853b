"""`vicuna-sky`: one thin command-line app. Parse, call one function, print.

Every user-facing failure is a `VicunaSkyError`, printed as one line with exit status 2.
Each command module registers its commands on the one click group in `app.py`.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click
from rich.markup import escape

from vicuna_sky.cli import data, delta, evaluate, export, launch  # noqa: F401 (register)
from vicuna_sky.cli.app import app, err_console
from vicuna_sky.errors import VicunaSkyError


@app.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Where the demo writes its model, data, bucket and logs.",
)
@click.option(
    "--recipe",
    default="smollm2-cpu",
    show_default=True,
    help="A CPU recipe of a built-in model: smollm2-cpu (SmolLM2-135M, LoRA) or tiny-cpu "
    "(a random tiny Llama, fast).",
)
def demo(workdir: Path, recipe: str) -> None:
    """Run the whole pipeline locally on a CPU recipe and summarise what ran."""
    from vicuna_sky.output import check_dir_place

    check_dir_place(workdir)  # a file, under a file, unwritable: one line, not a traceback
    from vicuna_sky import demo as demo_lib

    demo_lib.run(workdir, recipe)


@app.command()
@click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="List the models of this runs directory's local runs (RUNS/models) instead.",
)
def models(runs_dir: Path | None) -> None:
    """The built-in models (usable wherever a model or tokenizer is asked for) and where they
    are made: $VICUNA_SKY_MODELS_DIR, else runs/models."""
    from vicuna_sky.cli.app import console
    from vicuna_sky.models import listing

    # Lines, not a table: a path is never folded, whatever the width.
    for row in listing(runs_dir / "models" if runs_dir else None):
        console.print(f"[bold]{row['name']}[/]: {row['model']}", highlight=False)
        console.print(f"  {row['path']} ({row['state']})", highlight=False, soft_wrap=True)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so every `with` and `finally` on the way out runs:
    a local fleet is stopped, temporaries removed, worker pools shut down."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main() -> None:
    # Importing SkyPilot configures the root logger at INFO (every HTTP request of every library
    # would print); a handler of ours at WARNING first makes that configuration a no-op.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.UsageError as e:
        # One line, like every other error: the usage is one `--help` away.
        where = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        err_console.print(
            f"[bold red]error:[/] {escape(e.format_message())}{where}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except VicunaSkyError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Terminated:
        err_console.print("terminated")
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
