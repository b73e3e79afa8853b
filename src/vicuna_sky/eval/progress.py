"""Run coroutines with bounded concurrency behind one rich progress bar."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


async def run_all(
    items: Sequence[T],
    work: Callable[[T], Awaitable[None]],
    *,
    concurrency: int,
    description: str,
    show: bool = True,
) -> None:
    gate = asyncio.Semaphore(concurrency)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not show) as progress:
        task = progress.add_task(description, total=len(items))

        async def one(item: T) -> None:
            async with gate:
                await work(item)
            progress.advance(task)

        await asyncio.gather(*(one(item) for item in items))
