"""The host service: add, delete and reconnect hosts, and track (ping) the hosts this MN owns.

The tracker pings every host the ring gives this MN, every `ZSTACK_HOST_PING_INTERVAL` seconds
(default 1), and marks a host Disconnected after `ZSTACK_HOST_PING_FAILURES` (default 3) failed
pings in a row. Each round stamps `last_ping_at`/`tracked_by` on the hosts it pinged. When this MN
joins or gains hosts from an MN that left, it pings at once, as ZStack's host tracker does.

`HostPing` (a bus call, sent by POST /v1/hosts/{uuid}/actions/ping on any MN) reaches the host's owner,
which pings the host now through the same simulated agent. A manual ping is a read: it changes neither
the host's state nor the tracker's count of failed pings, so only the tracker disconnects a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
        metrics.HOSTS_TRACKED.set(0)
        await self.close()

    # ---- tracking ----------------------------------------------------------------------------

    async def _track(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.ping_interval)
            self._wake.clear()
            if self.ctx.state != "running" or not self.ctx.may_act() or self.ctx.uuid is None:
                continue
            try:
                await self._ping_round(self.ctx.uuid)
            except SQLAlchemyError as exc:
                log.warning("host tracking skipped a round: %s", first_line(exc))
            except Exception:
                log.exception("host tracking round failed")

    async def _ping_round(self, me: str) -> None:
        hosts, faulty = await self.db(_hosts_and_faults)
        ring = self.ctx.ring
        mine = [h for h in hosts if ring.members and ring.owner(h.uuid) == me]
        metrics.HOSTS_TRACKED.set(len(mine))
        mine_uuids = {h.uuid for h in mine}
        self._failures = {u: n for u, n in self._failures.items() if u in mine_uuids}
        if not mine or not self.ctx.may_act():  # the read may have outlasted my heartbeat
            return
        answers = await self.agent.ping([h.uuid for h in mine], faulty)
        await self.db(_stamp_tracked, [h.uuid for h in mine], me)
        for host in mine:
            if answers[host.uuid]:
                metrics.HOST_PINGS.labels("ok").inc()
                self._failures.pop(host.uuid, None)
                continue
            metrics.HOST_PINGS.labels("failed").inc()
            failures = self._failures[host.uuid] = self._failures.get(host.uuid, 0) + 1
            if failures >= self.max_failures and host.state == "Connected":
                await self._disconnect(host, failures)

    async def _disconnect(self, host: Row, failures: int) -> None:
        try:
            await self.db(_set_host_state, host, "Disconnected")
        except repo.StaleWrite:
            return  # changed meanwhile: the next round sees its new state
        metrics.HOSTS_DISCONNECTED.inc()
        log.warning("host %s (%s) is Disconnected: %d pings failed in a row", host.uuid, host.name, failures)

    # ---- jobs --------------------------------------------------------------------------------

    async def apply(self, job: Row, me: str) -> Row:
        if job.operation == "host.add":
            await self._agent("connect", job.resource_uuid)
            return await self.db(self._add, job, me)
        if job.operation == "host.delete":
            return await self.db(self._delete, job, me)
        host = await self.db(repo.get_host, job.resource_uuid)
        if host is None:
            raise JobFailure("not_found", f"host {job.resource_uuid} does not exist")
        faulty = await self.db(faulty_hosts)
        if not (await self.agent.ping([host.uuid], faulty))[host.uuid]:
            with contextlib.suppress(repo.StaleWrite):
                if host.state == "Connected":
                    await self.db(_set_host_state, host, "Disconnected")
            raise JobFailure("host_unreachable", f"host {host.uuid} does not answer pings")
        self._failures.pop(host.uuid, None)
        return await self.db(self._reconnect, job, me, host)

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


def _hosts_and_faults(conn: Connection) -> tuple[list[Row], set[str]]:
    return list(conn.execute(text("SELECT uuid, name, state, version FROM hosts"))), faulty_hosts(conn)


def _ping_target(conn: Connection, host_uuid: str) -> tuple[bool, set[str]]:
    """Whether the host exists, and {host_uuid} if a sim_host_faults row says its agent does not answer pings."""
    row = conn.execute(text(
        "SELECT EXISTS (SELECT 1 FROM hosts WHERE uuid = :u) AS host,"
        " EXISTS (SELECT 1 FROM sim_host_faults WHERE host_uuid = :u AND ping_fails) AS fault"),
        {"u": host_uuid}).one()
    return row.host, {host_uuid} if row.fault else set()


def _stamp_tracked(conn: Connection, hosts: list[str], me: str) -> None:
    conn.execute(text("UPDATE hosts SET last_ping_at = clock_timestamp(), tracked_by = :me WHERE uuid = ANY(:h)"),
                 {"me": me, "h": hosts})


def _set_host_state(conn: Connection, host: Row, state: str) -> Row:
    """Change a host's state fenced by its version; raise StaleWrite if it moved on."""
    row = conn.execute(text("UPDATE hosts SET state = :s, version = version + 1 WHERE uuid = :u AND version = :v"
                            " RETURNING *"), {"s": state, "u": host.uuid, "v": host.version}).first()
    if row is None:
        raise repo.StaleWrite(f"host {host.uuid} changed after version {host.version}")
    return row
