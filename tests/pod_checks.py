"""What tests look at to tell whether a test pod's ticking user container runs or is frozen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from testbed.pods import Pod

USER = "user-container"


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def until(predicate: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Return once ``predicate()`` holds; fail the test naming ``what`` after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {limit} s")
        await asyncio.sleep(0.01)


async def log_is_quiet(pod: Pod, seconds: float = 0.6) -> bool:
    """No new line for ``seconds`` (the ticker logs every 150 ms while it runs)."""
    await asyncio.sleep(0.1)
    before = len(pod.log_lines(USER))
    await asyncio.sleep(seconds)
    return len(pod.log_lines(USER)) == before


async def log_grows(pod: Pod) -> bool:
    before = len(pod.log_lines(USER))
    return await eventually(lambda: len(pod.log_lines(USER)) >= before + 2)
