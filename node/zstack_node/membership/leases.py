"""Lease membership of one MN: holds its Lease, keeps the table of its cluster's Leases, and says how far
Lease evidence can be trusted. The rule itself is in rule.py, the API calls in lease_client.py; ring changes
are node.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from zstack_kube.login import login, namespace
from zstack_node import metrics
from zstack_node.config import Settings, call_limit, call_timeout
from zstack_node.membership.lease_client import LeaseApi, LeaseEvent, LeaseWatcher, Outcome, Result
from zstack_node.membership.rule import LeaseFact, LeaseTable, OwnLease

log = logging.getLogger(__name__)


class LeaseMembership:
    """The Kubernetes side of membership. Create it, `await start()`, then read `events`."""

    def __init__(self, settings: Settings, client_factory: Callable[[], Any] = login) -> None:
        self.settings = settings
        self.table = LeaseTable()
        self.own = OwnLease(settings.lease_duration, call_limit(call_timeout(settings.lease_duration)))
        self.events: asyncio.Queue[LeaseEvent] = asyncio.Queue()
        self.holder: str | None = None  # the MN UUID my Lease is held for; None while not held
        self._factory = client_factory
        self._lock = asyncio.Lock()  # one call on my Lease at a time: they share its last version
        self._api: LeaseApi | None = None
        self._watcher: LeaseWatcher | None = None
        self._renewals_failing = False
        self._watch_failing = False
        self._dropped = 0  # counts dropped(): an acquire that started before one must not take effect

    async def start(self) -> None:
        """Log in, find the namespace, and start watching. Raises zstack_kube's KubeError when impossible."""
        s = self.settings
        ns = namespace(s.pod_namespace)
        await asyncio.to_thread(self._factory)  # fail early on a bad kubeconfig
        timeout = call_timeout(s.lease_duration)
        self._api = LeaseApi(self._factory, ns, s.lease_name, s.cluster, s.lease_duration, s.pod_name,
                             timeout)
        emit, broken = self.watch_callbacks(asyncio.get_running_loop())
        self._watcher = LeaseWatcher(self._factory, ns, s.cluster, timeout, emit=emit, broken=broken)
        self._watcher.start()
        log.info("Lease membership on: Lease %s/%s, label zstack.io/cluster=%s, duration %.0fs",
                 ns, s.lease_name, s.cluster, s.lease_duration)

    def watch_callbacks(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[Callable[[LeaseEvent], None], Callable[[str], None]]:
        """The watch thread's `emit` and `broken`: both put into `events`, so the loop applies them in order."""

        def post(event: LeaseEvent) -> None:
            """From the watch thread to the loop; after shutdown there is nobody left to tell."""
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        return post, lambda why: post(LeaseEvent("BROKEN", reason=why))

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    # ---- my Lease --------------------------------------------------------------------------

    async def acquire(self, me: str) -> bool:
        """Create or take over my Lease for `me` (before my DB row exists). False: not held yet."""
        assert self._api is not None
        async with self._lock:
            self.holder = None
            self.own.released()
            started, dropped = time.monotonic(), self._dropped
            result = await asyncio.to_thread(self._api.acquire, me)
            if dropped != self._dropped:  # I fenced myself meanwhile: the rejoin acquires for its own UUID
                return False
            if result.outcome is Outcome.OK:
                self.holder = me
                self.own.succeeded(started, time.monotonic(), result.renew_time)
                self._renewals_failing = False
                return True
        self._renew_failed(result)
        return False

    async def renew(self) -> Result | None:
        """Renew my Lease; None when none is held. A LOST result means: fence."""
        assert self._api is not None
        async with self._lock:
            me = self.holder
            if me is None:
                return None
            started = time.monotonic()
            self.own.attempting(started)
            result = await asyncio.to_thread(self._api.renew, me)
            finished = time.monotonic()
            metrics.LEASE_RENEW_SECONDS.observe(finished - started)
            if self.holder != me:  # I fenced myself meanwhile: this answer concerns nobody any more
                return None
            if result.outcome is Outcome.OK:
                self.own.succeeded(started, finished, result.renew_time)
                if self._renewals_failing:
                    log.info("my Lease is renewed again: Lease evidence counts again")
                    self._renewals_failing = False
            elif result.outcome is Outcome.LOST:
                metrics.LEASE_RENEW_FAILURES.labels("lost").inc()
            else:
                self._renew_failed(result)
            return result

    def _renew_failed(self, result: Result) -> None:
        self.own.failed(time.monotonic())  # when it ended: an attempt that outlived its limit is a stall
        metrics.LEASE_RENEW_FAILURES.labels("unreachable").inc()
        if not self._renewals_failing:
            log.warning("cannot renew my Lease (%s): Leases decide nothing until it works; DB heartbeats "
                        "alone decide membership", result.reason)
            self._renewals_failing = True

    @property
    def unreachable(self) -> bool:
        """True since my last acquire or renewal failed for want of the API server, until one succeeds."""
        return self._renewals_failing

    def dropped(self) -> None:
        """I fenced myself: the Lease is no longer held for my old UUID (the rejoin takes it over)."""
        self.holder = None
        self._dropped += 1
        self.own.released()

    async def release(self, me: str) -> None:
        """Graceful leave: delete my Lease so that every MN drops me at once."""
        assert self._api is not None
        async with self._lock:
            self.holder = None
            self.own.released()
            result = await asyncio.to_thread(self._api.release, me)
        if result.outcome is Outcome.FAILED:
            log.warning("could not delete my Lease (%s); the garbage collector removes it with my Pod",
                        result.reason)

    # ---- the cluster's Leases ----------------------------------------------------------------

    def apply(self, event: LeaseEvent) -> set[str]:
        """Update the table from one watch event; the MN UUIDs that lost their Lease."""
        now = time.monotonic()
        if event.kind == "BROKEN":
            self._watch_broken(event.reason)
            return set()
        if event.kind == "SYNCED":
            self.own.watch_synced(now)
            if self._watch_failing:
                log.info("Lease watch synced again (%d Lease(s))", len(event.items))
                self._watch_failing = False
            for name, _holder, renew_time, _duration in event.items:
                if name == self.settings.lease_name:
                    self.own.echoed(renew_time)
            return self.table.resync(event.items, now)
        if event.kind == "DELETED":
            return self.table.delete(event.name)
        if event.name == self.settings.lease_name:
            self.own.echoed(event.renew_time)
        return self.table.upsert(event.name, event.holder, event.renew_time, event.duration, now)

    def _watch_broken(self, why: str) -> None:
        self.own.watch_broken()
        if not self._watch_failing:
            log.warning("Lease watch broken (%s): Leases decide nothing until it is synced again", why)
            self._watch_failing = True

    def holders(self) -> dict[str, LeaseFact]:
        return self.table.holders()

    def watch_clock(self) -> float | None:
        """The time up to which my watch is proven current (rule 2b)."""
        return self.own.watch_clock

    def trusted_since(self, now: float) -> float | None:
        trusted = self.own.trusted_since(now)
        metrics.LEASE_TRUSTED.set(0 if trusted is None else 1)
        return trusted
