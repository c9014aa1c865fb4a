"""Stopping background asyncio tasks at shutdown, the same way in every process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def cancel_all(tasks: Iterable[asyncio.Future[object] | asyncio.Future[None]]) -> None:
    """Cancel every task, then wait for each to finish: a loop's ``finally`` (closing a
    socket, handing a job back) runs before the process exits. A task that had already
    failed is not this shutdown's concern: its error was logged when it happened."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
