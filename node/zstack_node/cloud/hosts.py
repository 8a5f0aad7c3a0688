"""The host service: add, delete and reconnect hosts, and track (ping) the hosts this MN owns.

The tracker pings every host the ring gives this MN, every `ZSTACK_HOST_PING_INTERVAL` seconds
(default 1), and marks a host Disconnected after `ZSTACK_HOST_PING_FAILURES` (default 3) failed
pings in a row. When this MN joins or gains hosts from an MN that left, it pings them at once, as
ZStack's host tracker does. How it scales to 10,000 hosts (`zstack-bench hosts` measures it):

- The hosts it owns are cached. The cache is rebuilt from a full read when the ring changes and every
  `REFRESH_INTERVALS` intervals (at most `REFRESH_MAX_S`), and grows between those by a cheap read of the
  hosts created in the last seconds. A host deleted through the API leaves at once (its owner runs the job).
- Each host has a fixed slot inside the interval (a hash of its UUID), so pings are spread over the
  interval in small batches, one every `1/SLICES` of it, instead of one burst.
- `tracked_by` is written when it changes; `last_ping_at` is written with it and then at most every
  `STAMP_INTERVALS` intervals, so it says "tracked, pinged within that time", not the last ping.
- `zstack_host_ping_lag_seconds` observes, for every tracker ping, how late it was sent against the
  host's schedule: its slot (or, for a host just gained or found, the moment it became due).

`HostPing` (a bus call, sent by POST /v1/hosts/{uuid}/actions/ping on any MN) reaches the host's owner,
which pings the host now through the same simulated agent. A manual ping is a read: it changes neither
the host's state nor the tracker's count of failed pings, so only the tracker disconnects a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import SQLAlchemyError

from zstack_node.bus.envelope import Envelope
from zstack_node.cloud import metrics, repo
from zstack_node.cloud.jobs import JobDriver, JobFailure
from zstack_node.cloud.simulator import AgentError, Simulator, faulty_hosts
from zstack_node.errors import first_line
from zstack_node.ring import Ring, RingChange
from zstack_node.service import Service, ServiceContext, ServiceError, handles

log = logging.getLogger(__name__)

SERVICE = "host"
MESSAGE = "HostJob"
PING = "HostPing"

SLICES = 10  # tracker ticks per interval: a host's ping is at most this share of the interval late
TICK_MAX_S = 1.0  # ... and a tick at least every second, whatever the interval
REFRESH_INTERVALS = 10  # full read of the hosts every this many intervals
REFRESH_MAX_S = 60.0  # ... and at least this often
SCAN_MAX_S = 2.0  # read the hosts created lately every interval, at least this often
CREATED_SLACK = timedelta(seconds=5)  # a host's created_at is its transaction's start: read back this far
STAMP_INTERVALS = 10  # last_ping_at is at most this many intervals old while its host is tracked


@dataclass
class Tracked:
    """A host this MN owns, as the tracker knows it: its row's state, and when its next ping is due."""

    uuid: str
    name: str
    state: str
    version: int
    tracked_by: str | None
    due: float  # time.monotonic() of the next ping
    stamped: float = -math.inf  # time.monotonic() of this MN's last stamp of last_ping_at


def slot_after(host_uuid: str, now: float, interval: float) -> float:
    """The host's first slot after `now`: slots are one interval apart, at a phase hashed from its UUID."""
    phase = zlib.crc32(host_uuid.encode()) / 2**32 * interval
    return phase + (math.floor((now - phase) / interval) + 1) * interval


class HostService(JobDriver, Service):
    """Runs host.* jobs and tracks the hosts this MN owns."""

    name = SERVICE
    operations = frozenset({"host.add", "host.delete", "host.reconnect"})

    def __init__(self, ctx: ServiceContext) -> None:
        Service.__init__(self, ctx)
        JobDriver.__init__(self, ctx)
        tuning = ctx.settings.cloud
        self.agent = Simulator(tuning)
        self.ping_interval = tuning.host_ping_interval
        self.max_failures = tuning.host_ping_failures
        self._failures: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._tracker: asyncio.Task[None] | None = None
        self._owned: dict[str, Tracked] = {}
        self._cached_for: tuple[str, frozenset[str]] | None = None  # (my UUID, ring members) of the cache
        self._refresh_at = 0.0  # monotonic time of the next full read
        self._scan_at = 0.0  # monotonic time of the next read of new hosts
        self._created_since: datetime | None = None  # the newest created_at the cache surely holds

    @handles(MESSAGE)
    async def on_job(self, msg: Envelope) -> None:
        self.submit(str(msg.body["job"]), str(msg.body["resource"]))

    @handles(PING)
    async def on_ping(self, msg: Envelope) -> dict[str, Any]:
        """Ping one host now; the reply is the body of POST /v1/hosts/{uuid}/actions/ping."""
        host_uuid = str(msg.body["host"])
        exists, faulty = await self.db(_ping_target, host_uuid)
        if not exists:
            raise ServiceError("not_found", f"host {host_uuid} does not exist")
        started = time.perf_counter()
        reachable = (await self.agent.ping([host_uuid], faulty))[host_uuid]
        seconds = time.perf_counter() - started
        error = None if reachable else f"host {host_uuid} did not answer the ping: its agent is unreachable"
        return {"uuid": host_uuid, "reachable": reachable, "error": error, "tracked_by": self.ctx.uuid,
                "seconds": round(seconds, 6)}

    # ---- takeover ----------------------------------------------------------------------------

    async def on_self_joined(self, ring: Ring) -> None:
        if self._tracker is None or self._tracker.done():
            self._tracker = asyncio.create_task(self._track(), name="host-tracker")
        self._wake.set()

    async def on_node_left(self, change: RingChange) -> None:
        self._wake.set()  # ping the hosts we gained now
        self.count_gained(change, "host", _host_uuids)

    async def on_node_joined(self, change: RingChange) -> None:
        self._wake.set()  # drop the hosts the new MN took from us

    async def on_self_dead(self) -> None:
        if self._tracker is not None:
            self._tracker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tracker
        self._tracker = None
        self._failures.clear()
        self._owned.clear()
        self._cached_for = None
        metrics.HOSTS_TRACKED.set(0)
        await self.close()

    # ---- tracking ----------------------------------------------------------------------------

    async def _track(self) -> None:
        tick = min(self.ping_interval / SLICES, TICK_MAX_S)
        next_tick = time.monotonic()
        while True:
            next_tick = max(next_tick + tick, time.monotonic())  # a fixed beat: a slow tick does not push the next
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), next_tick - time.monotonic())
            self._wake.clear()
            if self.ctx.state != "running" or not self.ctx.may_act() or self.ctx.uuid is None:
                continue
            try:
                await self._tick(self.ctx.uuid)
            except SQLAlchemyError as exc:
                log.warning("host tracking skipped a tick: %s", first_line(exc))
            except Exception:
                log.exception("host tracking tick failed")

    async def _tick(self, me: str) -> None:
        """Ping the hosts whose slot has come, and bring the owned set up to date when that is due. A ring
        change (or a rejoin) is read first, so that the hosts it gives this MN are pinged in this tick."""
        ring = self.ctx.ring
        if self._cached_for != (me, ring.members):
            await self._refresh(me, ring)
        await self._ping_due(me)
        now = time.monotonic()
        if now >= self._refresh_at:
            await self._refresh(me, ring)
        elif now >= self._scan_at:
            await self._scan_new(me, ring)

    async def _ping_due(self, me: str) -> None:
        now = time.monotonic()
        due = [t for t in self._owned.values() if t.due <= now]
        if due and self.ctx.may_act():  # a read may have outlasted my heartbeat
            await self._ping(due, me)

    async def _refresh(self, me: str, ring: Ring) -> None:
        """Rebuild the owned set from every host row. Hosts gained by a ring change (or at join) are due now;
        hosts found otherwise are due one interval from now, as a new host waited for the next round."""
        rows, created_since = await self.db(_read_owned, ring, me)
        now = time.monotonic()
        ring_changed = self._cached_for != (me, ring.members)
        owned: dict[str, Tracked] = {}
        for row in rows:
            known = self._owned.get(row.uuid)
            if known is None:
                owned[row.uuid] = self._track_row(row, now if ring_changed else now + self.ping_interval)
                continue
            known.name, known.state, known.version, known.tracked_by = row.name, row.state, row.version, row.tracked_by
            owned[row.uuid] = known
        self._owned = owned
        self._failures = {u: n for u, n in self._failures.items() if u in owned}
        self._cached_for = (me, ring.members)
        self._created_since = created_since
        self._refresh_at = now + min(REFRESH_INTERVALS * self.ping_interval, REFRESH_MAX_S)
        self._scan_at = now + min(self.ping_interval, SCAN_MAX_S)
        metrics.HOSTS_TRACKED.set(len(owned))

    async def _scan_new(self, me: str, ring: Ring) -> None:
        """Add the hosts created since the last read that the ring gives me; they are due one interval on."""
        if self._created_since is None:
            return
        rows, created_since = await self.db(_read_created, ring, me, self._created_since)
        if self._cached_for != (me, ring.members):
            return  # the ring moved meanwhile: the next tick reads everything
        now = time.monotonic()
        for row in rows:
            if row.uuid not in self._owned:
                self._owned[row.uuid] = self._track_row(row, now + self.ping_interval)
        self._created_since = max(self._created_since, created_since)
        self._scan_at = now + min(self.ping_interval, SCAN_MAX_S)
        metrics.HOSTS_TRACKED.set(len(self._owned))

    @staticmethod
    def _track_row(row: Row, due: float) -> Tracked:
        return Tracked(row.uuid, row.name, row.state, row.version, row.tracked_by, due)

    async def _ping(self, due: list[Tracked], me: str) -> None:
        """Ping `due` in one batch, schedule each at its next slot, stamp those whose stamp is due."""
        faulty = await self.db(faulty_hosts)
        sent = time.monotonic()
        for host in due:
            metrics.HOST_PING_LAG.observe(max(0.0, sent - host.due))
            host.due = slot_after(host.uuid, sent, self.ping_interval)
        answers = await self.agent.ping([h.uuid for h in due], faulty)
        await self._stamp(due, me, sent)
        for host in due:
            if host.uuid not in self._owned:
                continue  # deleted meanwhile
            if answers[host.uuid]:
                metrics.HOST_PINGS.labels("ok").inc()
                self._failures.pop(host.uuid, None)
                continue
            metrics.HOST_PINGS.labels("failed").inc()
            failures = self._failures[host.uuid] = self._failures.get(host.uuid, 0) + 1
            if failures >= self.max_failures and host.state == "Connected":
                await self._disconnect(host, failures)

    async def _stamp(self, pinged: list[Tracked], me: str, now: float) -> None:
        """Write tracked_by (and last_ping_at) where it changed or the stamp is old; forget deleted hosts."""
        every = STAMP_INTERVALS * self.ping_interval
        stale = [h for h in pinged if h.tracked_by != me or now - h.stamped >= every]
        if not stale:
            return
        present = await self.db(_stamp_tracked, [h.uuid for h in stale], me)
        for host in stale:
            if host.uuid in present:
                host.tracked_by, host.stamped = me, now
            else:
                self._forget(host.uuid)

    def _forget(self, host_uuid: str) -> None:
        """A host this MN owned is gone: stop tracking it."""
        self._owned.pop(host_uuid, None)
        self._failures.pop(host_uuid, None)
        metrics.HOSTS_TRACKED.set(len(self._owned))

    def _remember(self, row: Row) -> None:
        """A job or the tracker changed a host's row: keep the cache's state and version with it."""
        known = self._owned.get(row.uuid)
        if known is not None:
            known.state, known.version = row.state, row.version

    async def _disconnect(self, host: Tracked, failures: int) -> None:
        row = await self.db(repo.get_host, host.uuid)
        if row is None:
            self._forget(host.uuid)
            return
        if row.state != "Connected":
            self._remember(row)
            return
        try:
            row = await self.db(_set_host_state, row, "Disconnected")
        except repo.StaleWrite:
            return  # changed meanwhile: the next failed ping reads its new state
        self._remember(row)
        metrics.HOSTS_DISCONNECTED.inc()
        log.warning("host %s (%s) is Disconnected: %d pings failed in a row", host.uuid, host.name, failures)

    # ---- jobs --------------------------------------------------------------------------------

    async def apply(self, job: Row, me: str, prepared: Any = None) -> Row:
        if job.operation == "host.add":
            await self._agent("connect", job.resource_uuid)
            return await self.db(self._add, job, me)
        if job.operation == "host.delete":
            row = await self.db(self._delete, job, me)
            self._forget(job.resource_uuid)
            return row
        host = await self.db(repo.get_host, job.resource_uuid)
        if host is None:
            raise JobFailure("not_found", f"host {job.resource_uuid} does not exist")
        faulty = await self.db(faulty_hosts)
        if not (await self.agent.ping([host.uuid], faulty))[host.uuid]:
            with contextlib.suppress(repo.StaleWrite):
                if host.state == "Connected":
                    self._remember(await self.db(_set_host_state, host, "Disconnected"))
            raise JobFailure("host_unreachable", f"host {host.uuid} does not answer pings")
        self._failures.pop(host.uuid, None)
        finished = await self.db(self._reconnect, job, me, host)
        self._remember(await self.db(repo.get_host, host.uuid) or host)
        return finished

    async def _agent(self, operation: str, host_uuid: str) -> None:
        try:
            await self.agent.call(host_uuid, operation)
        except AgentError as exc:
            raise JobFailure("agent_error", str(exc)) from None

    def _add(self, conn: Connection, job: Row, me: str) -> Row:
        repo.touch_job(conn, job.id, me)
        params = job.parameters
        row = conn.execute(text(
            "INSERT INTO hosts (uuid, name, cpu_capacity, memory_capacity, state) VALUES (:u, :n, :c, :m, 'Connected')"
            " ON CONFLICT (uuid) DO NOTHING RETURNING *"),
            {"u": job.resource_uuid, "n": params["name"], "c": params["cpu"], "m": params["memory"]}).first()
        if row is None:
            raise JobFailure("already_exists", f"uuid: host {job.resource_uuid} already exists")
        return repo.finish_job(conn, job.id, me, result=repo.host_dict(row))

    def _delete(self, conn: Connection, job: Row, me: str) -> Row:
        repo.touch_job(conn, job.id, me)
        row = conn.execute(text(
            "DELETE FROM hosts h WHERE uuid = :u AND cpu_used = 0 AND memory_used = 0 AND NOT EXISTS"
            " (SELECT 1 FROM vm_instances v WHERE v.host_uuid = h.uuid AND v.state <> 'Destroyed') RETURNING *"),
            {"u": job.resource_uuid}).first()
        if row is None:
            if repo.get_host(conn, job.resource_uuid) is None:
                raise JobFailure("not_found", f"host {job.resource_uuid} does not exist")
            raise JobFailure("host_has_vms", f"host {job.resource_uuid} has VMs placed on it: destroy or migrate "
                                             "them first")
        conn.execute(text("DELETE FROM sim_host_faults WHERE host_uuid = :u"), {"u": job.resource_uuid})
        return repo.finish_job(conn, job.id, me, result=repo.host_dict(row))

    def _reconnect(self, conn: Connection, job: Row, me: str, host: Row) -> Row:
        repo.touch_job(conn, job.id, me)
        return repo.finish_job(conn, job.id, me, result=repo.host_dict(_set_host_state(conn, host, "Connected")))


def _host_uuids(conn: Connection) -> list[str]:
    return [r.uuid for r in conn.execute(text("SELECT uuid FROM hosts"))]


_TRACK_COLUMNS = "uuid, name, state, version, tracked_by"


def _mine(rows: list[Row], ring: Ring, me: str) -> list[Row]:
    return [r for r in rows if ring.owner(r.uuid) == me] if ring.members else []


def _read_owned(conn: Connection, ring: Ring, me: str) -> tuple[list[Row], datetime]:
    """Every host `ring` gives `me` (the ring lookups run on this worker thread, off the event loop), and the
    created_at from which a later read of new hosts must start."""
    since = conn.execute(text("SELECT now()")).scalar_one() - CREATED_SLACK
    rows = list(conn.execute(text(f"SELECT {_TRACK_COLUMNS} FROM hosts")))
    return _mine(rows, ring, me), since


def _read_created(conn: Connection, ring: Ring, me: str, since: datetime) -> tuple[list[Row], datetime]:
    """The hosts created after `since` that `ring` gives `me`, and where the next such read starts."""
    next_since = conn.execute(text("SELECT now()")).scalar_one() - CREATED_SLACK
    rows = list(conn.execute(text(f"SELECT {_TRACK_COLUMNS} FROM hosts WHERE created_at > :s"), {"s": since}))
    return _mine(rows, ring, me), next_since


def _ping_target(conn: Connection, host_uuid: str) -> tuple[bool, set[str]]:
    """Whether the host exists, and {host_uuid} if a sim_host_faults row says its agent does not answer pings."""
    row = conn.execute(text(
        "SELECT EXISTS (SELECT 1 FROM hosts WHERE uuid = :u) AS host,"
        " EXISTS (SELECT 1 FROM sim_host_faults WHERE host_uuid = :u AND ping_fails) AS fault"),
        {"u": host_uuid}).one()
    return row.host, {host_uuid} if row.fault else set()


def _stamp_tracked(conn: Connection, hosts: list[str], me: str) -> set[str]:
    """Stamp `hosts` as pinged by `me` now; the UUIDs that still exist."""
    return set(conn.execute(text("UPDATE hosts SET last_ping_at = clock_timestamp(), tracked_by = :me"
                                 " WHERE uuid = ANY(:h) RETURNING uuid"), {"me": me, "h": hosts}).scalars())


def _set_host_state(conn: Connection, host: Row, state: str) -> Row:
    """Change a host's state fenced by its version; raise StaleWrite if it moved on."""
    row = conn.execute(text("UPDATE hosts SET state = :s, version = version + 1 WHERE uuid = :u AND version = :v"
                            " RETURNING *"), {"s": state, "u": host.uuid, "v": host.version}).first()
    if row is None:
        raise repo.StaleWrite(f"host {host.uuid} changed after version {host.version}")
    return row
