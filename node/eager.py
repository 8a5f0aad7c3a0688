"""Start a coroutine at once instead of one event-loop pass later (what Python 3.12's eager tasks do).

A handler that never waits (an echo, a ring lookup, a cache read) then finishes inside the
delivery callback that received its message, and its reply goes out in the same pass. A handler
that does wait is wrapped in a Task from its first suspension on, with the usual semantics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
    """Run `coro` up to its first suspension now; return the Task that finishes it, or None."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_finish(_Resumed(coro, first)))


async def _finish(resumed: _Resumed) -> Any:
    return await resumed


class _Resumed:
    """Awaitable that hands the Task the future `coro` already yielded, then keeps delegating."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.first
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # the Task throws cancellation or errors into us
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
