"""One management node: joins the ring, heartbeats, reconciles, evicts, fences, leaves.

Membership follows one rule (DESIGN.md): an MN is in the ring while its heartbeat is fresh by
the database's clock. Join and leave events make changes fast; a periodic reconcile against the
table makes them certain. An MN that cannot prove it is alive stops serving and rejoins under a
new UUID, so nothing is ever served twice under one identity.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from . import metrics
from .bus import CloudBus
from .config import Settings, redact
from .db import make_engine, migrate
from .membership import RUNNING, Membership
from .ring import Ring, RingChange
from .service import Service

log = logging.getLogger(__name__)

T = TypeVar("T")

JOINED_TOPIC = "mn.joined"
LEFT_TOPIC = "mn.left"


class ManagementNode:
    """Holds every service of this process and its copy of the ring."""

    def __init__(self, settings: Settings, service_classes: Sequence[type[Service]] = ()) -> None:
        self.settings = settings
        self.uuid: str | None = None
        self.state = "starting"  # starting, joining, running, fenced, leaving, stopped
        self.ring = Ring.of((), settings.ring_vnodes)
        self.engine = make_engine(settings.database_url_for_sqlalchemy)
        self.membership = Membership(self.engine, settings.heartbeat_timeout)
        self.bus = CloudBus(settings.broker_url, ring=lambda: self.ring, may_serve=self.alive,
                            call_timeout=settings.call_timeout)
        self.services: dict[str, Service] = {cls.name: cls(self) for cls in service_classes}
        self.address: str | None = None
        self.db_ok = False
        self._last_heartbeat = 0.0  # monotonic time of the last successful heartbeat
        self._heartbeat_failing = False
        self._evict_quiet_until = 0.0
        self._suspects: dict[str, float] = {}
        self._tombstones: set[str] = set()
        self._tombstone_order: deque[str] = deque(maxlen=4096)
        self._tasks: list[asyncio.Task[Any]] = []
        self._hooks: set[asyncio.Task[Any]] = set()
        self.ring_listeners: list[Callable[[RingChange], None]] = []

    # ---- facts -----------------------------------------------------------------------------

    def alive(self) -> bool:
        """True while this MN can prove it is alive: running, heartbeat written within the timeout."""
        return (self.state == "running"
                and time.monotonic() - self._last_heartbeat < self.settings.heartbeat_timeout)

    @property
    def ready(self) -> bool:
        return self.alive() and self.bus.connected and self.db_ok and self.uuid in self.ring

    def readiness(self) -> dict[str, bool]:
        return {"broker": self.bus.connected, "database": self.db_ok,
                "ring": self.uuid is not None and self.uuid in self.ring, "alive": self.alive()}

    def owner(self, resource_uuid: str) -> str:
        return self.ring.owner(resource_uuid)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait for the DB and the broker, join the ring, and start the background loops."""
        await self._retry("database", redact(self.settings.database_url), lambda: migrate(self.engine))
        self.db_ok = True
        self.bus.subscribe(JOINED_TOPIC, self._on_joined_event)
        self.bus.subscribe(LEFT_TOPIC, self._on_left_event)
        await self.bus.start()
        await self._join()
        interval = self.settings.heartbeat_interval
        self._tasks = [
            asyncio.create_task(self._every(interval, self._heartbeat, "heartbeat")),
            # Reconcile twice per interval: a crashed MN's heartbeat crosses the timeout between
            # two checks, so checking more often than heartbeats are written detects it sooner.
            asyncio.create_task(self._every(interval / 2, self._reconcile_periodically, "reconcile")),
            asyncio.create_task(self._every(interval / 4, self._watchdog, "watchdog")),
        ]

    async def leave(self, grace: float = 10.0) -> None:
        """Graceful leave: stop new work, finish in-flight work, delete the row, broadcast, exit."""
        if self.state != "running":
            await self._shutdown()
            return
        self.state = "leaving"
        me = self.uuid
        log.info("leaving the ring gracefully as %s", me)
        await self.bus.drain(grace)
        await self._run_hooks(lambda s: s.on_self_dead())
        try:
            await asyncio.to_thread(self.membership.remove, me)
        except SQLAlchemyError as exc:
            log.warning("could not delete my row (%s); others will evict it after the timeout", exc)
        self._publish_event(LEFT_TOPIC, {"uuid": me, "reason": "graceful"})
        log.info("left the ring gracefully as %s", me)
        await self._shutdown()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.close()
        self.engine.dispose()
        self.state = "stopped"

    async def _join(self) -> None:
        """Take a new UUID, register it, open its queues, and build the first ring."""
        self.state = "joining"
        self.uuid = uuidlib.uuid4().hex
        metrics.NODE_INFO.clear()
        metrics.NODE_INFO.labels(self.uuid, self.settings.hostname, self.settings.cluster).set(1)
        me = self.uuid
        await self._retry("database", "register", lambda: self.membership.register(
            me, self.settings.hostname, self.address))
        await self.bus.serve(me, self.services)
        await self._retry("database", "mark running", lambda: self.membership.mark_running(me))
        self._last_heartbeat = time.monotonic()
        self.state = "running"
        await self.reconcile()
        self._publish_event(JOINED_TOPIC, {"uuid": me, "hostname": self.settings.hostname})
        log.info("joined the ring as %s (%s); %d member(s), epoch %08x",
                 me, self.settings.hostname, len(self.ring), self.ring.epoch)
        await self._run_hooks(lambda s: s.on_self_joined(self.ring))

    async def fence(self, reason: str) -> None:
        """Stop serving at once, then rejoin under a new UUID once the DB answers again."""
        if self.state != "running":
            return
        old = self.uuid
        self.state = "fenced"
        metrics.FENCES.labels(reason.split(":")[0]).inc()
        log.error("fencing myself (%s): stopped serving as %s; will rejoin with a new UUID", reason, old)
        self._set_ring(Ring.of((), self.settings.ring_vnodes), "fenced")
        self._publish_event(LEFT_TOPIC, {"uuid": old, "reason": "fenced"})  # before the connection goes
        await self.bus.stop_serving(reason)
        await self._run_hooks(lambda s: s.on_self_dead())
        await self._retry("database", "remove fenced row", lambda: self.membership.remove(old))
        self._tombstone(old)
        await self._join()

    # ---- loops -----------------------------------------------------------------------------

    async def _every(self, period: float, step: Callable[[], Awaitable[None]], what: str) -> None:
        """Run `step` every `period` seconds; an unexpected error is logged, never fatal."""
        while True:
            await asyncio.sleep(period)
            try:
                await step()
            except Exception:
                log.exception("%s failed; trying again in %.2fs", what, period)

    async def _heartbeat(self) -> None:
        if self.state != "running":
            return
        me = self.uuid
        try:
            written = await asyncio.to_thread(self.membership.heartbeat, me)
        except SQLAlchemyError as exc:
            self.db_ok = False
            if not self._heartbeat_failing:
                log.warning("cannot write my heartbeat: %s", _first_line(exc))
            self._heartbeat_failing = True
            return
        self.db_ok = True
        if self._heartbeat_failing:
            # Others could not heartbeat either: their rows look stale for a while.
            self._evict_quiet_until = time.monotonic() + self.settings.heartbeat_timeout
            log.info("heartbeat written again after a database outage")
            self._heartbeat_failing = False
        if me != self.uuid or self.state != "running":
            return
        if written:
            self._last_heartbeat = time.monotonic()
            metrics.HEARTBEAT_AGE.set(0)
        else:
            await self.fence("row gone: my heartbeat row was deleted or went stale")

    async def _watchdog(self) -> None:
        """Fence when no heartbeat got through within the timeout, even if the DB call hangs."""
        age = time.monotonic() - self._last_heartbeat
        metrics.HEARTBEAT_AGE.set(age if self.state == "running" else 0)
        if self.state == "running" and age >= self.settings.heartbeat_timeout:
            await self.fence(f"heartbeat timeout: none written for {age:.1f}s")

    async def _reconcile_periodically(self) -> None:
        if self.state != "running":
            return
        try:
            await self.reconcile()
        except SQLAlchemyError as exc:
            log.debug("reconcile skipped: %s", _first_line(exc))

    async def reconcile(self) -> None:
        """Make the ring equal to the fresh RUNNING rows, and evict rows stale for two checks."""
        rows = await asyncio.to_thread(self.membership.members)
        if self.state != "running":
            return
        timeout = self.settings.heartbeat_timeout
        trusting_staleness = time.monotonic() >= self._evict_quiet_until
        live = {r.uuid for r in rows if r.state == RUNNING and r.age <= timeout} - self._tombstones
        live.add(self.uuid)
        if not trusting_staleness:
            live |= self.ring.members  # after my own DB outage, staleness proves nothing yet
        self._set_ring(Ring(frozenset(live), self.settings.ring_vnodes), "reconcile")
        stale = {r.uuid for r in rows if r.age > timeout and r.uuid != self.uuid}
        self._suspects = {u: t for u, t in self._suspects.items() if u in stale}
        if not trusting_staleness:
            return
        now = time.monotonic()
        for mn in stale:
            first_seen = self._suspects.setdefault(mn, now)
            if now - first_seen >= self.settings.heartbeat_interval * 0.9:
                await self._evict(mn)

    async def _evict(self, mn: str) -> None:
        if await asyncio.to_thread(self.membership.evict, mn):
            metrics.EVICTIONS.inc()
            log.warning("evicted MN %s: its heartbeat is older than %.1fs", mn, self.settings.heartbeat_timeout)
            self._publish_event(LEFT_TOPIC, {"uuid": mn, "reason": "evicted"})
        self._suspects.pop(mn, None)
        self._tombstone(mn)
        self._set_ring(self.ring.without_member(mn), "eviction")

    # ---- events and ring changes -------------------------------------------------------------

    def _ours(self, body: dict[str, Any]) -> bool:
        """Clusters may share a broker: only events of this MN's cluster count."""
        return body.get("cluster") == self.settings.cluster

    def _on_joined_event(self, _topic: str, body: dict[str, Any]) -> None:
        mn = body.get("uuid")
        if self._ours(body) and self.state == "running" and isinstance(mn, str) and mn not in self._tombstones:
            self._set_ring(self.ring.with_member(mn), "joined")

    def _on_left_event(self, _topic: str, body: dict[str, Any]) -> Any:
        mn = body.get("uuid")
        if not (self._ours(body) and isinstance(mn, str)):
            return None
        self._tombstone(mn)
        if mn == self.uuid and self.state == "running":
            return self.fence(f"evicted: another MN removed me ({body.get('reason')})")
        if self.state == "running":
            self._set_ring(self.ring.without_member(mn), str(body.get("reason", "left")))
        return None

    def _tombstone(self, mn: str) -> None:
        """UUIDs are never reused, so a left MN stays out even if a stale read names it."""
        if mn not in self._tombstones:
            if len(self._tombstone_order) == self._tombstone_order.maxlen:
                self._tombstones.discard(self._tombstone_order[0])
            self._tombstone_order.append(mn)
            self._tombstones.add(mn)

    def _set_ring(self, new: Ring, cause: str) -> None:
        """Swap in a new ring when the member set changed, and tell the bus and the services."""
        if new.members == self.ring.members:
            return
        change = RingChange(self.ring, new)
        self.ring = new
        metrics.RING_MEMBERS.set(len(new))
        metrics.RING_EPOCH.set(new.epoch)
        metrics.RING_CHANGES.labels(cause).inc()
        log.info("ring changed (%s): +%s -%s -> %d member(s), epoch %08x", cause,
                 _short(change.joined), _short(change.left), len(new), new.epoch)
        self.bus.ring_changed(change)
        for listener in self.ring_listeners:
            listener(change)
        if self.state != "running":
            return
        others_joined = change.joined - {self.uuid}
        if others_joined:
            self._spawn_hooks("node_joined", lambda s: s.on_node_joined(change))
        if change.left:
            self._spawn_hooks("node_left", lambda s: s.on_node_left(change))

    def _spawn_hooks(self, event: str, hook: Callable[[Service], Any]) -> None:
        for service in self.services.values():
            metrics.TAKEOVERS.labels(service.name, event).inc()
        task = asyncio.get_running_loop().create_task(self._run_hooks(hook))
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _run_hooks(self, hook: Callable[[Service], Any]) -> None:
        for service in self.services.values():
            try:
                await hook(service)
            except Exception:
                log.exception("takeover hook of service %s failed", service.name)

    # ---- helpers -----------------------------------------------------------------------------

    def _publish_event(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self.bus.publish_event(topic, {**body, "cluster": self.settings.cluster})
        except ConnectionError as exc:
            log.warning("could not broadcast %s for %s: %s (others reconcile from the table)",
                        topic, body.get("uuid"), exc)

    async def _retry(self, what: str, detail: str, operation: Callable[[], T]) -> T:
        """Run a DB operation in a thread, retrying with back-off and saying what it waits for."""
        delay, attempt = 0.2, 0
        while True:
            try:
                result = await asyncio.to_thread(operation)
                self.db_ok = True
                return result
            except SQLAlchemyError as exc:
                self.db_ok = False
                attempt += 1
                log.warning("waiting for the %s (%s): %s (attempt %d, next try in %.1fs)",
                            what, detail, _first_line(exc), attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _short(uuids: Iterable[str]) -> str:
    return ",".join(sorted(u[:8] for u in uuids)) or "none"
