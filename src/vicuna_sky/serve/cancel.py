"""Interrupting a task without ending it: the request's own task is cancelled to stop what it
waits on (a client gone, a body stalled, a worker's hop failed), and the cancellation is taken
back so the task goes on to answer. Below answers, auth and hop, which all do it."""

from __future__ import annotations

import asyncio


def took_back(task: asyncio.Task) -> bool:
    """Take back a cancellation of `task` made to interrupt it (not to end it): False when it was
    cancelled for another reason as well (counted from Python 3.11, then re-raised)."""
    uncancel = getattr(task, "uncancel", None)  # Python 3.10 nodes have no count to undo
    return uncancel is None or uncancel() == 0
