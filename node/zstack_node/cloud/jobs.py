"""Durable jobs: claimed by one MN at a time, run in order per resource, finished exactly once.

- A job row is written before its message is published, so an accepted job is never lost.
- The MN that runs a job claims it (compare-and-set on `jobs.mn`); every later write of the
  job, and each resource change it makes, is fenced in one transaction, so a stale runner fails
  its attempt instead of applying anything.
- A job's resource change and the job's own terminal state commit together: a re-driven job
  finds either its change applied and itself finished, or neither.
- A job that fails, for whatever reason, undoes its partial change with its terminal write, so it
  never leaves its resource in a transitional state (`abort`).
- Jobs on one resource run in acceptance order: a chain stops at the first job it cannot finish,
  and the sweeper drives the rest later, older ones first.
- The sweeper (on each resource's owner) drives jobs whose MN is gone or whose message was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import SQLAlchemyError

from zstack_node.cloud import metrics, repo
from zstack_node.cloud.repo import DB_UNAVAILABLE, TERMINAL, StaleWrite
from zstack_node.cloud.syncqueue import SyncQueues
from zstack_node.db import PING_AFTER_IDLE
from zstack_node.errors import first_line

if TYPE_CHECKING:
    from zstack_node.ring import RingChange
    from zstack_node.service import ServiceContext

log = logging.getLogger(__name__)

JOB_DONE_TOPIC = "cloud.job.done"
_ATTEMPTS = 6
_WAIT_FOR_OTHER = 30.0  # seconds a job waits for an older one still run by another live MN
_DB_THREADS = 4  # with the runtime's threads, within the engine's pool of 10 connections
_EXECUTORS: weakref.WeakKeyDictionary[Any, tuple[ThreadPoolExecutor, threading.local]] = weakref.WeakKeyDictionary()
T = TypeVar("T")


class JobFailure(Exception):
    """The job cannot be done (bad state, no capacity ...): it ends Failed with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class Database:
    """Runs a function in one transaction on the cloud's own worker threads.

    Not the loop's default executor: a backlog of job queries there would delay the membership
    heartbeat, and a late heartbeat fences the MN.
    """

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        shared = _EXECUTORS.get(ctx)
        if shared is None:
            shared = _EXECUTORS[ctx] = (ThreadPoolExecutor(_DB_THREADS, thread_name_prefix="cloud-db"),
                                        threading.local())
        self._executor, self._held = shared

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(self._in_transaction, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _in_transaction(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        conn = self._connection()
        try:
            with conn.begin():
                return fn(conn, *args, **kwargs)
        except BaseException:
            self._release()  # it may have lost its connection: the pool drops an invalidated one
            raise

    def _connection(self) -> Connection:
        """This worker thread's connection, kept between transactions while it is busy: a checkout and
        a checkin of the pool per transaction cost a fifth of the thread's CPU. One idle for longer
        than PING_AFTER_IDLE goes back to the pool, whose checkout pings it."""
        held, now = self._held, time.monotonic()
        conn: Connection | None = getattr(held, "conn", None)
        if conn is not None and (conn.closed or conn.invalidated or now - held.used > PING_AFTER_IDLE):
            self._release()
            conn = None
        if conn is None:
            conn = held.conn = self.ctx.engine.connect()
        held.used = now
        return conn

    def _release(self) -> None:
        conn = getattr(self._held, "conn", None)
        self._held.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


class JobDriver:
    """Runs the jobs of one kind of resource on this MN. Subclasses implement `apply`."""

    operations: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = Database(ctx)
        self.queues = SyncQueues()
        self.active: set[str] = set()  # jobs being run by this MN now
        self._background: set[asyncio.Task[Any]] = set()

    def submit(self, job_id: str, resource_uuid: str) -> asyncio.Future[Any]:
        """Queue a job behind the other work on its resource; it runs with the older open jobs first."""
        future = self.queues.submit(resource_uuid, lambda: self._drive(job_id))
        future.add_done_callback(_consume)
        return future

    async def _drive(self, job_id: str) -> None:
        me = self.ctx.uuid
        try:
            try:
                started = await self.db(self._start, job_id, me)
            except _NotStarted:
                started = None
            jobs = [started[0]] if started is not None else await self.db(repo.open_jobs_up_to, job_id)
        except SQLAlchemyError as exc:
            log.warning("cannot read job %s (%s); the sweeper will drive it", job_id, first_line(exc))
            return
        for job in jobs:
            if job.operation not in self.operations:
                continue
            if started is not None:
                ended = await self.run(started[0], prepared=started[1])
            else:
                ended = await self.run(job)
            if not ended and not await self._ended(job.id):
                # Running a newer job now would reorder the resource's operations (stop then start
                # applied as start then stop): leave it, and the rest, to the sweeper.
                log.info("job %s (%s) is not finished; the newer jobs on %s wait for the sweeper", job.id,
                         job.operation, job.resource_uuid)
                return

    def _start(self, conn: Connection, job_id: str, me: str | None) -> tuple[Row, Any] | None:
        """The common case in one transaction instead of three: the job is Pending, unclaimed and the
        oldest open job on its resource (`repo.claim_if_first`): claim it and do the first step of its
        work (`begin`). None if it is not that case; `_NotStarted` if the first step failed: the
        transaction rolls back, claim included, and `run` does the job the general way."""
        if me is None or not self.ctx.may_act():
            return None
        claimed = repo.claim_if_first(conn, job_id, me, sorted(self.operations))
        if claimed is None:
            return None
        try:
            return claimed, self.begin(conn, claimed, me)
        except Exception as exc:  # noqa: BLE001 - JobFailure, StaleWrite, a bug: `run` meets it again
            raise _NotStarted() from exc

    async def _ended(self, job_id: str) -> bool:
        """Whether the job is terminal now; False if the database cannot say."""
        try:
            row = await self.db(repo.get_job, job_id)
        except SQLAlchemyError as exc:
            log.warning("cannot read job %s (%s)", job_id, first_line(exc))
            return False
        return row is None or row.state in TERMINAL

    async def run(self, job: Row, prepared: Any = None) -> bool:
        """Drive one job to a terminal state, or leave it for the sweeper if that is impossible now.

        `prepared` is what `begin` returned when the job's claim and first step are done already.
        True if the job is known to be terminal now; False if it may not be."""
        me = self.ctx.uuid
        if me is None or not self.ctx.may_act():
            return False  # suspended or fenced: my sweeper once I resume, or the new owner's, drives it
        metrics.JOBS_IN_FLIGHT.inc()
        self.active.add(job.id)
        try:
            return await self._run(job, me, prepared)
        finally:
            self.active.discard(job.id)
            metrics.JOBS_IN_FLIGHT.dec()

    async def _run(self, job: Row | None, me: str, prepared: Any = None) -> bool:
        for attempt in range(_ATTEMPTS):
            if not self.ctx.may_act():
                return False  # suspended mid-job: my claim ages, and a sweeper drives the job later
            if attempt:
                prepared = None  # an attempt after a stale write starts from what the database says
                await asyncio.sleep(0.05 * attempt)
                job = await self._reread(job)  # type: ignore[arg-type]
            if job is None or job.state in TERMINAL:
                return True
            if job.mn not in (None, me) and job.mn in self.ctx.ring.members:
                job = await self._wait_for_other(job)
                if job is None or job.state in TERMINAL:
                    return True  # finished there
                if job.mn in self.ctx.ring.members:
                    return False  # still run by a live MN: not ours to touch
            try:
                if job.mn != me:
                    claimed = await self.db(repo.claim_job, job.id, me, job.mn)
                    if claimed is None:
                        raise StaleWrite("another MN claimed the job first, or it ended")
                    job = claimed
                try:
                    self._finished(await self.apply(job, me, prepared))
                except JobFailure as failure:
                    self._finished(await self.db(self.abort, job, me, failure))
                return True
            except StaleWrite as exc:
                metrics.STALE_WRITES.labels(job.operation).inc()
                log.info("job %s (%s): %s; reading it again", job.id, job.operation, exc)
            except DB_UNAVAILABLE as exc:
                log.warning("job %s (%s): database error %s; trying again", job.id, job.operation, first_line(exc))
                await asyncio.sleep(0.5)
            except Exception as exc:
                log.exception("job %s (%s) failed unexpectedly", job.id, job.operation)
                failure = JobFailure("internal_error", f"{type(exc).__name__}: {first_line(exc)}")
                try:
                    self._finished(await self.db(self.abort, job, me, failure))
                except (StaleWrite, SQLAlchemyError) as again:
                    log.warning("job %s (%s): could not record the failure (%s); the sweeper will drive it", job.id,
                                job.operation, first_line(again))
                    return False
                return True
        with contextlib.suppress(SQLAlchemyError):
            await self.db(repo.release_job, job.id, me)
        log.warning("job %s (%s): gave up after %d attempts; the sweeper will drive it", job.id, job.operation,
                    _ATTEMPTS)
        return False

    async def _reread(self, job: Row) -> Row | None:
        """The job's row now; the row we had if the database does not answer (the next write fails anyway)."""
        try:
            return await self.db(repo.get_job, job.id)
        except SQLAlchemyError as exc:
            log.warning("cannot read job %s: %s", job.id, first_line(exc))
            await asyncio.sleep(0.5)
            return job

    async def _wait_for_other(self, job: Row) -> Row | None:
        """An older job run by another live MN (the ring just changed): let it finish first."""
        deadline = time.monotonic() + _WAIT_FOR_OTHER
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            job = await self._reread(job)
            if job is None or job.state in TERMINAL or job.mn not in self.ctx.ring.members:
                return job
        return job

    def count_gained(self, change: RingChange, kind: str, read_uuids: Callable[[Connection], list[str]]) -> None:
        """Count the resources this MN gained in `change`, in the background: takeover hooks run one
        service after another, so none of them may wait for the database."""
        me = self.ctx.uuid
        if me is None:
            return

        async def count() -> None:
            try:
                gained = change.gained_by(me, await self.db(read_uuids))
            except SQLAlchemyError as exc:
                log.warning("could not count the %ss taken over: %s", kind, first_line(exc))
                return
            metrics.TAKEOVERS.labels(kind).inc()
            if gained:
                metrics.TAKEOVER_RESOURCES.labels(kind).inc(len(gained))
                log.info("took over %d %s(s) from %s", len(gained), kind, ",".join(sorted(u[:8] for u in change.left)))

        task = asyncio.get_running_loop().create_task(count(), name=f"count-{kind}-takeover")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def begin(self, conn: Connection, job: Row, me: str) -> Any:
        """The first step of a job just claimed, in the claim's transaction (which fences it); None if
        the driver has none. What it returns is passed to `apply` as `prepared`. Raise JobFailure or
        StaleWrite to roll back the claim with it: `run` then does the job the general way."""
        return None

    async def apply(self, job: Row, me: str, prepared: Any = None) -> Row:
        """Do the job's work and return its terminal row; raise JobFailure or StaleWrite.

        `prepared` is what `begin` returned when the first step is done already, in this attempt's claim
        transaction; None otherwise."""
        raise NotImplementedError

    def abort(self, conn: Connection, job: Row, me: str, failure: JobFailure) -> Row:
        """Fail the job in one transaction with the undo of any partial change it left on its resource."""
        return repo.finish_job(conn, job.id, me, error=failure.as_dict())

    def _finished(self, row: Row) -> None:
        metrics.JOBS_FINISHED.labels(row.operation, row.state).inc()
        if row.finished_at is not None:
            metrics.JOB_SECONDS.labels(row.operation).observe((row.finished_at - row.created_at).total_seconds())
        with contextlib.suppress(Exception):
            # The terminal job itself, so that an MN with a request waiting on it answers without a read.
            self.ctx.bus.publish_event(JOB_DONE_TOPIC, {"id": row.id, "state": row.state, "job": repo.job_dict(row)})

    async def close(self, grace: float = 5.0) -> None:
        """Stop running jobs; when leaving gracefully, let the running ones finish first (up to `grace`)."""
        if self.ctx.state == "leaving":
            await self.queues.drain(grace)
        await self.queues.close()


class _NotStarted(Exception):
    """The first step of a job claimed by `JobDriver._start` failed: its transaction rolled back."""


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("job chain failed: %r", future.exception())

