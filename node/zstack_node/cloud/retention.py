"""Retention: ended jobs, destroyed VMs and idempotency keys are purged once they outlive it.

Every MN purges periodically, but each deletes only the rows it owns by the ring (a job and a VM by
their resource's UUID, a key by its own text), so the work is split like everything else and no two
MNs delete the same rows. Rows are read and deleted in batches of `purge_batch`, one transaction
each, so a purge never holds long locks or a large result. Deleted hosts need nothing: a host
delete removes its row at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from zstack_node.cloud import metrics
from zstack_node.cloud.jobs import Database
from zstack_node.errors import first_line

if TYPE_CHECKING:
    from zstack_node.service import ServiceContext

log = logging.getLogger(__name__)

# kind -> (the expired rows after a key: (key, owner key), ordered by key; the delete of a list of keys)
_EXPIRED = {
    "job": "SELECT id, resource_uuid FROM jobs WHERE finished_at < clock_timestamp() - make_interval(secs => :r)"
           " AND id > :after ORDER BY id LIMIT :n",
    "vm": "SELECT v.uuid, v.uuid FROM vm_instances v WHERE v.state = 'Destroyed' AND v.uuid > :after"
          " AND NOT EXISTS (SELECT 1 FROM vm_history h WHERE h.vm_uuid = v.uuid"
          " AND h.at >= clock_timestamp() - make_interval(secs => :r)) ORDER BY v.uuid LIMIT :n",
    "idempotency_key": "SELECT key, key FROM idempotency_keys WHERE created_at < clock_timestamp()"
                       " - make_interval(secs => :r) AND key > :after ORDER BY key LIMIT :n",
}
_DELETE = {
    "job": ("DELETE FROM jobs WHERE id = ANY(:keys) AND finished_at IS NOT NULL",),
    # the VM's history goes with it; a VM is destroyed for good, so nothing can revive it meanwhile
    "vm": ("DELETE FROM vm_history WHERE vm_uuid = ANY(:keys)",
           "DELETE FROM vm_instances WHERE uuid = ANY(:keys) AND state = 'Destroyed'"),
    "idempotency_key": ("DELETE FROM idempotency_keys WHERE key = ANY(:keys)",),
}


class Purger:
    """Deletes, every `purge_interval`, what this MN owns and what outlived its retention."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = Database(ctx)
        tuning = ctx.settings.cloud
        self.interval = tuning.purge_interval
        self.batch = tuning.purge_batch
        self.retention = {"job": tuning.job_retention, "vm": tuning.job_retention,
                          "idempotency_key": tuning.idempotency_retention}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="retention-purger")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.purge()
            except SQLAlchemyError as exc:
                log.warning("purge skipped: %s", first_line(exc))
            except Exception:
                log.exception("purge failed")

    async def purge(self) -> dict[str, int]:
        """One pass over every kind; the rows this MN deleted, by kind."""
        return {kind: await self._purge_kind(kind) for kind in _EXPIRED}

    async def _purge_kind(self, kind: str) -> int:
        deleted, after = 0, ""
        while self._may_purge():
            rows = await self.db(_expired, kind, self.retention[kind], after, self.batch)
            mine = [key for key, owner_key in rows if self._owns(owner_key)]
            if mine:
                count = await self.db(_delete, kind, mine)
                deleted += count
                metrics.PURGED.labels(kind).inc(count)
            if len(rows) < self.batch:
                break
            after = rows[-1][0]
        if deleted:
            log.info("purged %d %s(s) past their retention of %gs", deleted, kind, self.retention[kind])
        return deleted

    def _may_purge(self) -> bool:
        return self.ctx.state == "running" and self.ctx.may_act() and bool(self.ctx.ring.members)

    def _owns(self, key: str) -> bool:
        return self.ctx.ring.owner(key) == self.ctx.uuid


def _expired(conn: Connection, kind: str, retention: float, after: str, limit: int) -> list[tuple[str, str]]:
    rows = conn.execute(text(_EXPIRED[kind]), {"r": retention, "after": after, "n": limit})
    return [(row[0], row[1]) for row in rows]


def _delete(conn: Connection, kind: str, keys: list[str]) -> int:
    count = 0
    for statement in _DELETE[kind]:
        count = conn.execute(text(statement), {"keys": keys}).rowcount
    return count  # the last statement's: the rows of the kind itself
