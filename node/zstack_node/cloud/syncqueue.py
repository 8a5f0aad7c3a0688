"""Per-resource FIFO chains (ZStack's sync queue), without locks.

Work for one key runs one item at a time, in submission order; different keys run concurrently.
A chain exists only while its key has work: the worker task removes it when it runs dry. Both
the check "is there a chain" and the append happen with no await in between, so the event loop
makes them atomic.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Work = Callable[[], Awaitable[Any]]


class SyncQueues:
    """One FIFO chain per busy key, each drained by its own task."""

    def __init__(self) -> None:
        self._chains: dict[str, deque[tuple[Work, asyncio.Future[Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: str, work: Work) -> asyncio.Future[Any]:
        """Queue `work` behind everything already queued for `key`; the future gets its outcome."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        chain = self._chains.get(key)
        if chain is not None:
            chain.append((work, future))
            return future
        chain = self._chains[key] = deque([(work, future)])
        task = asyncio.get_running_loop().create_task(self._drain(key, chain), name=f"sync-{key[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    def busy(self) -> int:
        """Keys with work queued or running."""
        return len(self._chains)

    async def _drain(self, key: str, chain: deque[tuple[Work, asyncio.Future[Any]]]) -> None:
        try:
            while chain:
                work, future = chain[0]
                try:
                    result = await work()
                except asyncio.CancelledError:
                    if not future.done():
                        future.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - the submitter gets it through the future
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
                chain.popleft()
        finally:
            for _work, future in chain:
                future.cancel()
            if self._chains.get(key) is chain:
                del self._chains[key]

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout` seconds) for the queued work to finish."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel every chain (this MN stopped acting on its resources)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
