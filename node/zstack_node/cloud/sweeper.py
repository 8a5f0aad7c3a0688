"""The job sweeper: finds accepted jobs nobody is driving and drives them on the resource's owner.

A job is abandoned when its MN left the ring (it died mid-job), when it has stayed Pending with
no MN for a grace period (its message was lost, e.g. in a crashed MN's exclusive queue), or when
this MN's own claim on it is older than that grace and nothing here runs it any more (a run that
gave up while the database was down).
Every MN sweeps periodically and at once on ring changes, but only the jobs whose resource it
owns, so each abandoned job has one driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy.engine import Row
from sqlalchemy.exc import SQLAlchemyError

from zstack_node.cloud import metrics, repo
from zstack_node.cloud.jobs import Database, JobDriver
from zstack_node.errors import first_line

if TYPE_CHECKING:
    from zstack_node.service import ServiceContext

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = Database(ctx)
        tuning = ctx.settings.cloud
        self.interval = tuning.job_sweep_interval
        self.pending_grace = tuning.job_pending_grace
        self.dead_grace = 0.5  # a job just claimed by an MN that my ring does not have yet
        self.page = 1000  # candidate jobs read per query
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._driving: set[str] = set()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="job-sweeper")
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        self._driving.clear()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            if self.ctx.state != "running" or not self.ctx.may_act():
                continue
            try:
                await self.sweep()
            except SQLAlchemyError as exc:
                log.warning("job sweep skipped: %s", first_line(exc))
            except Exception:
                log.exception("job sweep failed")

    async def sweep(self) -> int:
        """Submit every abandoned job whose resource this MN owns, oldest first; return how many."""
        me, ring = self.ctx.uuid, self.ctx.ring
        if me is None or not ring.members:
            return 0
        taken = 0
        after = None
        while True:
            rows = await self.db(repo.abandoned_jobs, me, sorted(ring.members), self.dead_grace, self.pending_grace,
                                 after, self.page)
            taken += sum(self._take(job, me) for job in rows)
            for job in rows:
                if self._stranded(job, me):
                    # Another MN owns its resource but skips a job claimed by a live MN: give it back.
                    await self.db(repo.release_job, job.id, me)
            if len(rows) < self.page:
                return taken
            after = (rows[-1].created_at, rows[-1].id)

    def _take(self, job: Row, me: str) -> bool:
        """Submit one candidate if its resource is ours and nothing here drives it already."""
        driver = self._driver(job.operation)
        if driver is None or job.id in self._driving or job.id in driver.active:
            return False
        if self.ctx.ring.owner(job.resource_uuid) != me:
            return False
        log.info("taking over job %s (%s on %s), left by MN %s", job.id, job.operation, job.resource_uuid,
                 job.mn or "none (message lost)")
        metrics.JOBS_SWEPT.inc()
        self._driving.add(job.id)
        driver.submit(job.id, job.resource_uuid).add_done_callback(
            lambda _f, job_id=job.id: self._driving.discard(job_id))
        return True

    def _stranded(self, job: Row, me: str) -> bool:
        """My claim on a job I no longer run, whose resource another MN owns (a create, or a ring change)."""
        driver = self._driver(job.operation)
        return (job.mn == me and driver is not None and job.id not in self._driving and job.id not in driver.active
                and self.ctx.ring.owner(job.resource_uuid) != me)

    def _driver(self, operation: str) -> JobDriver | None:
        service = self.ctx.services.get(operation.partition(".")[0])
        return service if isinstance(service, JobDriver) else None
