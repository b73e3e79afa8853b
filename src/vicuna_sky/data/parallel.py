"""Map a function over many samples on all cores, in chunks, with a progress bar."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PR_SET_PDEATHSIG = 1  # linux/prctl.h
T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the process that forked it dies, even by
    SIGKILL (nothing else would: the worker would go on burning a core for nobody)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _init_worker(parent: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    # Ctrl-C reaches the whole process group; it is the parent's to handle (it stops the pool).
    # A worker that raised KeyboardInterrupt itself would break the pool mid-shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop now: queued chunks cancelled, workers killed and reaped (no orphans, no hang)."""
    processes = list((pool._processes or {}).values())  # no public API lists them
    manager = pool._executor_manager_thread  # shutdown() forgets it (and the result queue)
    results = pool._result_queue
    # A chunk being fed to a worker when it dies stays half-written in the pipe, and the queue's
    # feeder thread blocks on it forever (this process holds the pipe's other end too); joining
    # that thread, as the pool and the exit hooks do, hung the exit (seen once in eight loaded
    # test runs). The chunks are abandoned anyway: do not wait for the feeder.
    if pool._call_queue is not None:
        pool._call_queue.cancel_join_thread()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            process.join(5)
    # A worker killed half-way through sending its result (a chunk's result is hundreds of KB,
    # many pipe-fulls) leaves a partial message in the result pipe. The manager thread reads
    # it and waits for the rest, forever: this process holds the pipe's write end too, so the
    # read never ends in EOF. The exit hooks join that thread without a timeout, and Ctrl-C
    # hung (2 of 14 runs). The workers are gone and nothing else writes there: closing our
    # write end turns the wait into EOF, the manager thread sees a broken pool and ends.
    if results is not None:
        with contextlib.suppress(OSError):
            results._writer.close()
    # The pool's manager thread closes its wake-up pipe when it sees the workers gone; Python's
    # exit hook writes to that pipe, and if the two race (on a busy machine) the exit printed
    # "OSError: Bad file descriptor" with a traceback after "aborted". Once the thread has
    # ended the pipe is marked closed and the hook skips it.
    if manager is not None:
        manager.join(10)


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
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), not {workers}")
    # More processes than cores only adds start-up time and memory.
    workers = min(workers or default_workers(), default_workers())
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
        pool = ProcessPoolExecutor(
            min(workers, len(chunks)),
            initializer=_init_worker,
            initargs=(os.getpid(), initializer, initargs),
        )
        # Futures of our own, not pool.map: on an interrupt, map's iterator cancels the queued
        # futures from this thread, and the pool's manager thread, seeing the killed workers,
        # then sets an exception on each of them; on a cancelled one that raises (Python 3.11),
        # and the thread died with a traceback after "aborted" (1 in 50 loaded Ctrl-C runs).
        # Here only the manager cancels them (`shutdown(cancel_futures=True)` in `_stop`).
        futures = [pool.submit(_run_chunk, fn, chunk) for chunk in chunks]
        try:
            for future in futures:
                done = future.result()
                results.extend(done)
                progress.advance(task, len(done))
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown()
        return results
