"""Taking back a cancellation made to interrupt a task (serve/cancel.py)."""

from __future__ import annotations

import asyncio

from vicuna_sky.serve.cancel import took_back


def test_a_cancellation_is_taken_back_only_when_it_was_the_only_one():
    async def interrupted(times: int) -> tuple[bool, bool]:
        task = asyncio.current_task()
        for _ in range(times):
            task.cancel()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            back = took_back(task)
            return back, task.cancelling() == 0
        raise AssertionError("not cancelled")

    assert asyncio.run(interrupted(1)) == (True, True)  # goes on, as if never cancelled
    # Cancelled for another reason as well (the server shutting down): that one stands.
    assert asyncio.run(interrupted(2)) == (False, False)
