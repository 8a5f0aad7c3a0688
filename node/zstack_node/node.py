"""One management node: joins the ring, heartbeats, reconciles, evicts, suspends, fences, leaves.

Membership follows one rule (docs/ARCHITECTURE.md; written out in membership/rule.py): an MN is in the ring while
its row is RUNNING and, in Kubernetes, its Lease is held and unexpired as far as this MN can tell. A row
leaves the table by a graceful leave or by eviction, and only an MN whose own heartbeats were unbroken for a
whole timeout may evict a silent peer, so an outage of the database or the broker that every MN shares
blames nobody. An expired Lease is acted on through the database (the row is deleted), so an MN cut off
from the API server alone learns it too. Join, leave and Lease events make changes fast; a periodic
reconcile against the table and the Leases makes them certain.

An MN that cannot prove it is alive (no heartbeat written for half the timeout, or no broker) suspends:
it stops consuming and acting but keeps its UUID, and resumes once a heartbeat finds its row still there.
It fences (stops, and rejoins under a new UUID) only when it sees itself evicted, so nothing is ever
served under an identity the others gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from zstack_kube.backoff import Backoff
from zstack_node import metrics
from zstack_node.bus.cloudbus import CloudBus
from zstack_node.config import Settings
from zstack_node.db import make_engine, migrate
from zstack_node.errors import first_line
from zstack_node.membership.lease_client import LeaseEvent, Outcome
from zstack_node.membership.leases import LeaseMembership
from zstack_node.membership.rule import Decision, decide, evictable, gap_limit, running_rows
from zstack_node.membership.table import LEAVING, RUNNING, Membership
from zstack_node.ring import Ring, RingChange
from zstack_node.schema import MIGRATIONS
from zstack_node.service import Service, ServiceContext

log = logging.getLogger(__name__)

JOINED_TOPIC = "mn.joined"
LEFT_TOPIC = "mn.left"
# The states of one MN (docs/ARCHITECTURE.md, "Membership states"). It acts on resources only while running.
STATES = ("starting", "joining", "running", "suspended", "fenced", "leaving", "stopped")

Hook = Callable[[Service], Awaitable[None]]


class ManagementNode:
    """Holds every service of this process and its copy of the ring."""

    def __init__(self, settings: Settings, service_classes: Sequence[type[Service]] = ()) -> None:
        self.settings = settings
        self.uuid: str | None = None
        self.state = "starting"  # see STATES
        self.ring = Ring.of((), settings.ring_vnodes)
        self.engine = make_engine(settings.database_url_for_sqlalchemy)
        self.membership = Membership(self.engine, settings.heartbeat_timeout, gap_limit(settings.heartbeat_timeout))
        self.bus = CloudBus(settings.broker_url, ring=lambda: self.ring, may_serve=self.alive,
                            call_timeout=settings.call_timeout)
        self.services: dict[str, Service] = {}
        context = ServiceContext(bus=self.bus, engine=self.engine, settings=settings, uuid=lambda: self.uuid,
                                 state=lambda: self.state, alive=self.alive, ring=lambda: self.ring,
                                 services=self.services)
        self.services.update((cls.name, cls(context)) for cls in service_classes)
        metrics.initialise(self.services, leases=settings.leases_enabled)
        self._set_state("starting")
        self.leases = LeaseMembership(settings) if settings.leases_enabled else None
        self.address: str | None = None
        self.db_ok = False
        self._last_heartbeat = 0.0  # monotonic time just before the last successful heartbeat write
        self._heartbeat_failing = False
        self._suspended_since: float | None = None
        self._event_joins: dict[str, float] = {}  # MN -> monotonic time its joined event arrived
        self._tombstones: set[str] = set()
        self._tombstone_order: deque[str] = deque(maxlen=4096)
        self._ring_lock = asyncio.Lock()
        self._hooks: asyncio.Queue[Hook] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._rejoining: asyncio.Task[None] | None = None
        self._renew_now = asyncio.Event()  # renew at once: prove my watch current (Decision.overdue)
        self._reconcile_now = asyncio.Event()  # reconcile at once: my watch clock moved past an overdue MN
        self._overdue: frozenset[str] = frozenset()
        self._lease_gone: dict[str, str] = {}  # MN -> "lease expired" or "lease gone": its row must go too

    # ---- facts -----------------------------------------------------------------------------

    def alive(self) -> bool:
        """True while this MN may act: serving, with a heartbeat written within the gap limit (half the
        timeout, so it stops well before anyone may evict it, however late its watchdog runs)."""
        now = time.monotonic()
        return (self.state in ("running", "leaving")
                and now - self._last_heartbeat < gap_limit(self.settings.heartbeat_timeout)
                and (self.leases is None or self.leases.own.stalled(now) is None))

    def readiness(self) -> dict[str, bool]:
        return {"broker": self.bus.connected, "database": self.db_ok,
                "ring": self.uuid is not None and self.uuid in self.ring, "alive": self.alive()}

    def owner(self, resource_uuid: str) -> str:
        return self.ring.owner(resource_uuid)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait for the DB and the broker, join the ring, and start the background loops."""
        await self._until_done("migrate the schema", lambda: asyncio.to_thread(migrate, self.engine, MIGRATIONS))
        self.db_ok = True
        if self.leases is not None:
            await self.leases.start()
        self.bus.subscribe(JOINED_TOPIC, self._on_joined_event)
        self.bus.subscribe(LEFT_TOPIC, self._on_left_event)
        await self.bus.start()
        interval = self.settings.heartbeat_interval
        self._tasks = [
            asyncio.create_task(self._run_hooks_in_order(), name="hooks"),
            asyncio.create_task(self._every(interval, self._heartbeat, "heartbeat")),
            # Reconcile twice per interval: a crashed MN's heartbeat crosses the timeout between
            # two checks, so checking more often than heartbeats are written detects it sooner.
            asyncio.create_task(self._every(interval / 2, self._reconcile_periodically, "reconcile",
                                            self._reconcile_now)),
            asyncio.create_task(self._every(interval / 4, self._watchdog, "watchdog")),
        ]
        if self.leases is not None:
            self._tasks += [
                asyncio.create_task(self._every(interval, self._renew_lease, "Lease renewal", self._renew_now)),
                asyncio.create_task(self._lease_events(self.leases), name="lease events"),
            ]
        await self._join()

    async def leave(self, grace: float = 10.0) -> None:
        """Graceful leave: stop new work, finish in-flight work, delete the row, broadcast, exit."""
        if self.state == "suspended":  # nothing in flight; the others drop me when my row goes
            with contextlib.suppress(SQLAlchemyError):
                await asyncio.to_thread(self.membership.remove, self.uuid)
            self._publish_event(LEFT_TOPIC, {"uuid": self.uuid, "reason": "graceful"})
        if self.state != "running":
            await self._shutdown()
            return
        self._set_state("leaving")
        me = self.uuid
        log.info("leaving the ring gracefully as %s", me)
        with contextlib.suppress(SQLAlchemyError):
            await asyncio.to_thread(self.membership.mark, me, LEAVING)  # others stop routing to me
        if self.leases is not None:
            await self.leases.release(me)  # every MN drops me at once
        await self.bus.drain(grace)
        await self._call_hooks(lambda s: s.on_self_dead())
        try:
            await asyncio.to_thread(self.membership.remove, me)
        except SQLAlchemyError as exc:
            log.warning("could not delete my row (%s); others will evict it after the timeout", exc)
        self._publish_event(LEFT_TOPIC, {"uuid": me, "reason": "graceful"})
        log.info("left the ring gracefully as %s", me)
        await self._shutdown()

    async def _shutdown(self) -> None:
        for task in [*self._tasks, self._rejoining]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.leases is not None:
            self.leases.stop()
        await self.bus.close()
        self.engine.dispose()
        self._set_state("stopped")

    async def _join(self) -> None:
        """Take a new UUID, register it, open its queues, and build the first ring.

        Any failure (broker or DB gone, the row going stale while the broker was awaited) undoes
        the attempt and tries again under a new UUID, with back-off.
        """
        backoff = Backoff(0.2, 5.0)
        while True:
            await self.bus.wait_connected()
            me = uuidlib.uuid4().hex
            self.uuid = me
            self._set_state("joining")
            try:
                await asyncio.to_thread(self.membership.register, me, self.settings.hostname, self.address)
                # The Lease before the row counts (RUNNING): others never see me without it for long.
                # After the row is written, so that a DB outage does not churn the Lease through UUIDs.
                if self.leases is not None and self.leases.unreachable:
                    # Waiting on a hung call could let the new row go stale; Leases decide nothing for me now.
                    log.warning("joining as %s without a Lease: the API server is out of reach; renewals keep "
                                "trying", me)
                elif self.leases is not None and not await self.leases.acquire(me):
                    log.warning("joining as %s without a Lease for now; renewals keep trying", me)
                await self.bus.serve(me, self.services)
                stamp = time.monotonic()
                if not await asyncio.to_thread(self.membership.mark, me, RUNNING):
                    raise RuntimeError("my new row went stale before I could mark it RUNNING")
                break
            except Exception as exc:  # noqa: BLE001 - whatever failed, the attempt is undone
                self.db_ok = not isinstance(exc, SQLAlchemyError)
                delay = backoff.next()
                log.warning("joining as %s failed: %s; trying again with a new UUID in %.1fs",
                            me, first_line(exc), delay)
                await self.bus.stop_serving("join failed")
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.membership.remove, me)
                await asyncio.sleep(delay)
        self.db_ok = True
        self._last_heartbeat = stamp
        self._set_state("running")
        metrics.NODE_INFO.clear()
        metrics.NODE_INFO.labels(me, self.settings.hostname, self.settings.cluster).set(1)
        with contextlib.suppress(SQLAlchemyError):
            await self.reconcile()
        self._publish_event(JOINED_TOPIC, {"uuid": me, "hostname": self.settings.hostname})
        await self.bus.accept_shared_work()
        log.info("joined the ring as %s (%s); %d member(s), epoch %08x",
                 me, self.settings.hostname, len(self.ring), self.ring.epoch)
        ring = self.ring
        self._hooks.put_nowait(lambda s: s.on_self_joined(ring))

    def _set_state(self, state: str) -> None:
        self.state = state
        for known in STATES:
            metrics.NODE_STATE.labels(known).set(1 if known == state else 0)

    async def suspend(self, reason: str) -> None:
        """Stop consuming and acting, but keep my UUID: a heartbeat that finds my row decides what next."""
        if self.state != "running":
            return
        self._set_state("suspended")
        self._suspended_since = time.monotonic()
        metrics.SUSPENSIONS.labels(reason.split(":")[0]).inc()
        log.warning("suspended (%s): not acting as %s until a heartbeat finds my row", reason, self.uuid)
        await self.bus.pause()

    async def _resume(self) -> None:
        """My heartbeat found my row: nobody evicted me, so I serve again under the same UUID."""
        if self.state != "suspended":
            return
        away = time.monotonic() - (self._suspended_since or time.monotonic())
        self._set_state("running")
        log.info("resumed as %s after %.1fs suspended; the ring is as it was", self.uuid, away)
        with contextlib.suppress(SQLAlchemyError):
            await self.reconcile()
        await self.bus.accept_shared_work()

    async def fence(self, reason: str) -> None:
        """Stop serving at once; rejoin under a new UUID in the background."""
        if self.state not in ("running", "suspended"):
            return
        old = self.uuid
        self._set_state("fenced")
        metrics.FENCES.labels(reason.split(":")[0]).inc()
        log.error("fencing myself (%s): stopped serving as %s; will rejoin with a new UUID", reason, old)
        if self.leases is not None:
            self.leases.dropped()
        self._install_ring(Ring.of((), self.settings.ring_vnodes), "fenced")
        self._publish_event(LEFT_TOPIC, {"uuid": old, "reason": "fenced"})  # before the connection goes
        await self.bus.stop_serving(reason)
        self._tombstone(old)
        self._hooks.put_nowait(lambda s: s.on_self_dead())
        self._rejoining = asyncio.create_task(self._rejoin(old), name="rejoin")

    async def _rejoin(self, old: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.membership.remove, old)  # else others evict it
        await self._join()

    # ---- loops -----------------------------------------------------------------------------

    async def _every(self, period: float, step: Callable[[], Awaitable[None]], what: str,
                     kick: asyncio.Event | None = None) -> None:
        """Run `step` every `period` seconds, or at once when `kick` is set; an error is logged, never fatal."""
        while True:
            if kick is None:
                await asyncio.sleep(period)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(kick.wait(), period)
                kick.clear()
            try:
                await step()
            except Exception:
                log.exception("%s failed; trying again in %.2fs", what, period)

    async def _heartbeat(self) -> None:
        """Write my heartbeat while I can serve (broker and DB); resume or fence on what it finds.

        Without the broker I write none, so an MN cut off from the broker alone goes stale and is evicted by
        the others, while an outage of the broker that every MN shares blames nobody (rule 1b)."""
        if self.state not in ("running", "suspended", "leaving"):
            return
        me = self.uuid
        stamp = time.monotonic()  # the DB stamps now() at or after this moment: never later than peers
        broker_ok = await self.bus.probe(self.settings.heartbeat_interval)
        try:
            if broker_ok:
                found = await asyncio.to_thread(self.membership.heartbeat, me)
            else:
                await self.suspend("broker unreachable")
                found = await asyncio.to_thread(self.membership.exists, me)  # evicted meanwhile?
        except SQLAlchemyError as exc:
            self.db_ok = False
            if not self._heartbeat_failing:
                log.warning("cannot write my heartbeat: %s", first_line(exc))
            self._heartbeat_failing = True
            await self.suspend(f"database unreachable: {first_line(exc)}")
            return
        self.db_ok = True
        if self._heartbeat_failing:
            log.info("heartbeat written again after a database outage")
            self._heartbeat_failing = False
        if me != self.uuid or self.state not in ("running", "suspended", "leaving"):
            return
        if not found:
            await self.fence("evicted: my heartbeat found my row deleted")
        elif broker_ok:
            self._last_heartbeat = stamp
            metrics.HEARTBEAT_AGE.set(time.monotonic() - stamp)
            await self._resume()

    async def _watchdog(self) -> None:
        """Suspend when this MN cannot prove it is alive, even while a DB call hangs."""
        if self.state != "running":
            return
        age = time.monotonic() - self._last_heartbeat
        metrics.HEARTBEAT_AGE.set(age)
        if await self._fence_if_lease_stalled():
            return
        if not self.bus.connected:
            # Its queues are gone with the connection: nobody can reach it, and it must not act unseen.
            await self.suspend("broker unreachable")
        elif age >= gap_limit(self.settings.heartbeat_timeout):
            await self.suspend(f"heartbeat overdue: none written for {age:.1f}s")

    async def _reconcile_periodically(self) -> None:
        if self.state != "running":
            return
        try:
            await self.reconcile()
        except SQLAlchemyError as exc:
            log.debug("reconcile skipped: %s", first_line(exc))

    async def reconcile(self) -> None:
        """Make the ring equal to the RUNNING rows (less expired Leases), and evict the peers rule 1b lets me."""
        started = time.monotonic()
        rows = await asyncio.to_thread(self.membership.members)
        if self.state != "running":
            return
        timeout = self.settings.heartbeat_timeout
        running = set(running_rows(rows))
        # A joined event newer than this snapshot outranks it.
        self._event_joins = {u: t for u, t in self._event_joins.items() if started - t < timeout}
        running |= {u for u, t in self._event_joins.items() if t >= started}
        decision = self._decide(running)
        for source, count in (("db", len(decision.db)), ("lease", len(decision.lease)),
                              ("both", len(decision.db & decision.lease))):
            metrics.MEMBERS_BY_SOURCE.labels(source).set(count)
        cause = "lease expired" if decision.expired & self.ring.members else "reconcile"
        await self._change_ring(lambda _current: decision.members, cause)
        self._lease_gone.update(dict.fromkeys(decision.expired, "lease expired"))
        await self._evict_lease_gone({r.uuid for r in rows if r.state == RUNNING})
        self._overdue = decision.overdue
        if decision.overdue:
            self._renew_now.set()  # its echo proves my watch current, or nothing expires
        for mn in sorted(evictable(rows, self.uuid, timeout)):
            await self._evict(mn)

    def _decide(self, fresh: set[str]) -> Decision:
        now = time.monotonic()
        if self.leases is None:
            return decide(fresh, self.uuid, {}, self._tombstones, None, None, now)
        return decide(fresh, self.uuid, self.leases.holders(), self._tombstones, self.leases.trusted_since(now),
                      self.leases.watch_clock(), now)

    async def _evict_lease_gone(self, running_rows: set[str]) -> None:
        """Act on lost Leases through the DB, which the MN may reach while the API server is out of its
        reach: its row goes, so it fences itself (LEFT event, or its next heartbeat) and rejoins anew.

        A delete that fails (a DB blip) is tried again at the next reconcile while the row is RUNNING;
        otherwise the MN would stay out of every ring yet keep serving under its old UUID.
        """
        self._lease_gone = {mn: why for mn, why in self._lease_gone.items()  # gone, or leaving by itself
                            if mn in running_rows and mn != self.uuid}
        for mn, why in sorted(self._lease_gone.items()):
            self._tombstone(mn)
            try:
                evicted = await asyncio.to_thread(self.membership.evict_expired, mn)
            except SQLAlchemyError as exc:
                log.debug("evicting MN %s for its Lease failed (%s); trying again", mn, first_line(exc))
                return
            del self._lease_gone[mn]
            if evicted:  # only the MN whose DELETE matched announces it
                metrics.EVICTIONS.labels("lease").inc()
                log.warning("evicted MN %s: %s", mn, f"its Lease was not renewed for {self.settings.lease_duration}s"
                            if why == "lease expired" else "its Lease was released, deleted or taken over")
                self._publish_event(LEFT_TOPIC, {"uuid": mn, "reason": why})

    async def _evict(self, mn: str) -> None:
        """Delete a silent peer's row (rule 1b); only the MN whose DELETE matched announces it."""
        if not await asyncio.to_thread(self.membership.evict, mn):
            return  # already gone, or fresh again: the next reconcile sees which
        metrics.EVICTIONS.labels("heartbeat").inc()
        log.warning("evicted MN %s: its heartbeat is older than %.1fs", mn, self.settings.heartbeat_timeout)
        self._tombstone(mn)
        self._publish_event(LEFT_TOPIC, {"uuid": mn, "reason": "evicted"})
        await self._change_ring(lambda current: current - {mn}, "eviction")

    async def _renew_lease(self) -> None:
        """Renew my Lease every interval; a lost Lease fences me, an unreachable API server does not."""
        assert self.leases is not None
        if self.state == "running" and self.leases.holder is None:
            await self.leases.acquire(self.uuid)  # the API server was unreachable when I joined
            return
        if self.state not in ("running", "suspended", "leaving"):
            return
        if await self._fence_if_lease_stalled():  # renewing now would hide that others may have dropped me
            return
        result = await self.leases.renew()
        if result is not None and result.outcome is Outcome.LOST:
            await self.fence(f"lease lost: {result.reason}")

    async def _fence_if_lease_stalled(self) -> bool:
        """Rule 4: fence when my renewal gap outgrew the Lease while I stood still. True when it did."""
        stalled = self.leases.own.stalled(time.monotonic()) if self.leases is not None else None
        if stalled is None:
            return False
        await self.fence(f"lease lost: not renewed for {stalled:.1f}s, others may have seen it expire")
        return True

    async def _lease_events(self, leases: LeaseMembership) -> None:
        """Apply Lease events in order: a released, deleted or taken-over Lease drops its MN at once."""
        while True:
            event = await leases.events.get()
            try:
                await self._on_lease_event(leases, event)
            except Exception:
                log.exception("handling Lease event %s %s failed", event.kind, event.name)

    async def _on_lease_event(self, leases: LeaseMembership, event: LeaseEvent) -> None:
        before, clock = self.ring.members, leases.watch_clock()
        lost = leases.apply(event)
        if self._overdue and leases.watch_clock() != clock:
            self._reconcile_now.set()  # my renewal came back: an overdue MN may be expired now
        for mn in lost:
            self._tombstone(mn)
            self._event_joins.pop(mn, None)
        if lost - {self.uuid}:
            self._lease_gone.update(dict.fromkeys(lost - {self.uuid}, "lease gone"))
            self._reconcile_now.set()  # delete their rows too: an MN cut off from the API server may live on
        if self.uuid in lost and self.state in ("running", "suspended"):
            await self.fence(f"lease lost: my Lease {event.name} was {event.kind.lower()} by someone else")
        elif lost - {self.uuid}:  # while leaving I keep myself, as without Leases
            await self._change_ring(lambda current: current - (lost - {self.uuid}), "lease gone")
        effect = "ring_change" if self.ring.members != before else "none"
        metrics.LEASE_EVENTS.labels(effect).inc()

    # ---- events and ring changes -------------------------------------------------------------

    def _ours(self, body: dict[str, Any]) -> bool:
        """Clusters may share a broker by mistake: only events of this MN's cluster count."""
        return body.get("cluster") == self.settings.cluster

    def _on_joined_event(self, _topic: str, body: dict[str, Any]) -> Awaitable[None] | None:
        mn = body.get("uuid")
        if not (self._ours(body) and isinstance(mn, str)) or mn in self._tombstones:
            return None
        self._event_joins[mn] = time.monotonic()
        return self._change_ring(lambda current: current | {mn}, "joined")

    def _on_left_event(self, _topic: str, body: dict[str, Any]) -> Awaitable[None] | None:
        mn = body.get("uuid")
        if not (self._ours(body) and isinstance(mn, str)):
            return None
        self._tombstone(mn)
        self._event_joins.pop(mn, None)
        if mn == self.uuid:
            return self.fence(f"evicted: another MN removed me ({body.get('reason')})")
        return self._change_ring(lambda current: current - {mn}, str(body.get("reason", "left")))

    def _tombstone(self, mn: str) -> None:
        """UUIDs are never reused, so a left MN stays out even if a stale read names it."""
        if mn not in self._tombstones:
            if len(self._tombstone_order) == self._tombstone_order.maxlen:
                self._tombstones.discard(self._tombstone_order[0])
            self._tombstone_order.append(mn)
            self._tombstones.add(mn)

    async def _change_ring(self, update: Callable[[frozenset[str]], frozenset[str]], cause: str) -> None:
        """Apply membership changes one at a time, in arrival order, building each ring off the loop."""
        async with self._ring_lock:
            if self.state not in ("running", "leaving"):
                return
            members = update(self.ring.members)
            if members == self.ring.members:
                return  # a renewal or a repeated event: no rebuild, no log
            new = await asyncio.to_thread(Ring(members, self.settings.ring_vnodes).build)
            if self.state in ("running", "leaving"):
                self._install_ring(new, cause)

    def _install_ring(self, new: Ring, cause: str) -> None:
        """Swap in a new ring, and tell the bus and (in order) the services' takeover hooks."""
        change = RingChange(self.ring, new)
        self.ring = new
        metrics.RING_MEMBERS.set(len(new))
        metrics.RING_EPOCH.set(new.epoch)
        metrics.RING_CHANGES.labels(cause).inc()
        log.info("ring changed (%s): +%s -%s -> %d member(s), epoch %08x", cause,
                 _short(change.joined), _short(change.left), len(new), new.epoch)
        self.bus.ring_changed(change)
        if self.state != "running":
            return
        if change.joined - {self.uuid}:
            self._queue_hooks("node_joined", lambda s: s.on_node_joined(change))
        if change.left:
            self._queue_hooks("node_left", lambda s: s.on_node_left(change))

    def _queue_hooks(self, event: str, hook: Hook) -> None:
        for service in self.services.values():
            metrics.TAKEOVERS.labels(service.name, event).inc()
        self._hooks.put_nowait(hook)

    async def _run_hooks_in_order(self) -> None:
        """One worker: takeover hooks see ring changes in the order they happened."""
        while True:
            hook = await self._hooks.get()
            await self._call_hooks(hook)

    async def _call_hooks(self, hook: Hook) -> None:
        for service in self.services.values():
            try:
                await hook(service)
            except Exception:
                log.exception("takeover hook of service %s failed", service.name)

    # ---- helpers -----------------------------------------------------------------------------

    def _publish_event(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self.bus.publish_event(topic, {**body, "cluster": self.settings.cluster})
        except Exception as exc:  # noqa: BLE001 - others reconcile from the table anyway
            log.warning("could not broadcast %s for %s: %s (others reconcile from the table)",
                        topic, body.get("uuid"), exc)

    async def _until_done(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Retry a DB operation with back-off, saying in the log what it waits for."""
        backoff, attempt = Backoff(0.2, 5.0), 0
        while True:
            try:
                return await operation()
            except SQLAlchemyError as exc:
                self.db_ok = False
                attempt += 1
                delay = backoff.next()
                log.warning("waiting for the database to %s: %s (attempt %d, next try in %.1fs)",
                            what, first_line(exc), attempt, delay)
                await asyncio.sleep(delay)



def _short(uuids: Iterable[str]) -> str:
    return ",".join(sorted(u[:8] for u in uuids)) or "none"
