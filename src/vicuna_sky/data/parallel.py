"""Map a function over many samples on all cores, in chunks, with a progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_chunk(fn: Callable[[T], R], chunk: Sequence[T]) -> list[R]:
    return [fn(item) for item in chunk]


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int = 0,
    description: str = "working",
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    show_progress: bool = True,
) -> list[R]:
    """`[fn(x) for x in items]`, in order. Items go to worker processes in chunks (one IPC round
    trip per chunk, not per sample). `initializer(*initargs)` prepares each worker process;
    with `workers=1` everything runs in this process, which the caller has prepared itself.
    `fn` and `initializer` must be picklable (module-level functions or partials of them)."""
    workers = workers or default_workers()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=len(items))
        if workers == 1 or len(items) < 2:
            results = []
            for item in items:
                results.append(fn(item))
                progress.advance(task)
            return results
        size = max(1, min(256, len(items) // (workers * 8) or 1))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        results = []
        with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
            for done in pool.map(_run_chunk, [fn] * len(chunks), chunks):
                results.extend(done)
                progress.advance(task, len(done))
        return results
