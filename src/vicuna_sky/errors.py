"""The one error type the CLI turns into a clear one-line message and a non-zero exit, and the
helper that makes any error one line."""

import re


class VicunaSkyError(Exception):
    """A user-facing problem: bad input, a broken spec, a failed run. Never a bug."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(error: BaseException) -> str:
    """SkyPilot errors are multi-line and coloured; keep the first meaningful line."""
    text = _ANSI.sub("", str(error)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
