"""The membership rule in one pure place (docs/ARCHITECTURE.md, "Membership states"). No I/O, no clocks of its own.

The rule implemented here:

1. DB: an MN is a candidate while its row exists and is RUNNING. A row leaves the table only by a graceful
   leave, or by eviction (1b): never merely by going stale, so every MN that reads the table agrees.
   b. Nobody is blamed for a shared outage. I may evict a peer whose heartbeat is older than the timeout
      only while I can witness against it (`can_witness`): my own heartbeats succeeded with no gap longer
      than `max_gap` through the whole last timeout, by the DB clock (`continuous_for`). Then the database
      and the broker were there for it too, and it wrote nothing. After an outage that hit every MN (the
      database, or the broker, which stops heartbeats: node.py), nobody can witness until a full timeout
      of heartbeats has passed, by which time every MN that lives has written again.
2. Leases (only when running in Kubernetes) can only take candidates out, never add them:
   a. a Lease released (holderIdentity cleared), deleted, or taken over by another holder takes its
      previous holder out at once and for good (UUIDs are never reused) - see `LeaseTable`;
   b. a Lease held by X expires when my watch shows no renewal of it for its leaseDurationSeconds, counted
      from the later of my last observation of it and the moment my Lease view became trustworthy, up to
      the *watch clock*: the start of my own latest renewal that has come back on my watch. Everything
      written before that renewal was delivered before its echo, so the watch is proven current up to
      that moment and no later; a silent or lagging watch stops the clock instead of expiring everyone.
      A candidate that looks expired by `now` but not yet by the watch clock is `overdue`: the node
      renews at once, and the echo moves the clock (or does not, and nothing expires);
   c. an MN holding no Lease I have seen is judged by its DB row alone (an MN outside Kubernetes, an MN
      that cannot reach the API server to take its Lease, or a Lease my watch has not delivered yet);
   d. an expired candidate is evicted through the database (its row deleted, a LEFT event published), the
      channel it can still reach: it fences itself and rejoins under a new UUID, and every ring agrees.
3. Trust: evidence from a source this MN cannot reach counts for nothing. Expiry (2b) counts only while my
   view is trustworthy: my last renewal started within the Lease duration and succeeded, with no failure
   since; my watch is synced (a fresh list since it last broke); and a renewal of mine that started within
   the duration has come back on that watch (the watch clock is less than a duration old). Trust counts
   from the later of my first success after a failure and the last sync. Otherwise Leases decide nothing,
   and DB heartbeats alone decide: an outage of the whole API server never makes MNs evict each other.
4. Self-fencing on my own Lease (see `OwnLease`): my Lease is lost - stop serving, rejoin under a new
   UUID - when a renewal finds it deleted (404) or held by another holder, or when my renewal gap grew
   past the duration while this process stood still (SIGSTOP, a long GC pause), because others could see
   it expire. A renewal attempt that lasts longer than any call can while the process runs (`call_limit`)
   means the process stood still during it: the gap then runs to now while it is in flight, and to the
   moment it ended once it failed or succeeded (a late success proves nothing about when it was written).
   Renewals that fail within `call_limit` because the API server is unreachable (connection errors,
   timeouts, 5xx, 429, ...) fence nothing: they only end the trust of 3.
5. I always count myself while I can prove I am alive (node.py suspends me otherwise, and a heartbeat that
   finds my row gone fences me).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from zstack_node.membership.table import RUNNING, MemberRow


@dataclass(frozen=True)
class LeaseFact:
    """What I know of one Lease: its holder (None when released), and when I saw it renewed."""

    holder: str | None
    renew_time: str | None  # spec.renewTime as the API server returned it; compared, never parsed
    duration: float  # spec.leaseDurationSeconds
    observed: float  # my monotonic time when I first saw this holder with this renewTime


@dataclass(frozen=True)
class Decision:
    """The live member set, the counts by source for the metrics, and what the node must act on."""

    members: frozenset[str]
    db: frozenset[str]  # fresh RUNNING rows
    lease: frozenset[str]  # holders of unexpired Leases
    expired: frozenset[str]  # candidates taken out by Lease expiry (2b): evict them through the DB (2d)
    overdue: frozenset[str] = frozenset()  # expired by now, not yet by the watch clock: renew to prove it


def running_rows(rows: Iterable[MemberRow]) -> frozenset[str]:
    """Rule 1: the MNs whose rows are RUNNING, fresh or not."""
    return frozenset(r.uuid for r in rows if r.state == RUNNING)


def gap_limit(timeout: float) -> float:
    """The longest gap between two heartbeats that still counts as continuous, and the heartbeat age at
    which an MN suspends itself: half the timeout, so it stops acting well before anyone may evict it."""
    return timeout / 2


def can_witness(mine: MemberRow | None, timeout: float) -> bool:
    """Rule 1b: my heartbeats have been continuous for the last `timeout` seconds, up to now."""
    return mine is not None and mine.age <= gap_limit(timeout) and mine.continuous_for >= timeout


def evictable(rows: Iterable[MemberRow], me: str | None, timeout: float) -> frozenset[str]:
    """Rule 1b: the peers whose heartbeat is older than the timeout, if I can witness against them."""
    rows = list(rows)
    if not can_witness(next((r for r in rows if r.uuid == me), None), timeout):
        return frozenset()
    return frozenset(r.uuid for r in rows if r.uuid != me and r.age > timeout)


def expired_holders(holders: Mapping[str, LeaseFact], trusted_since: float | None,
                    clock: float | None) -> frozenset[str]:
    """Rule 2b under rule 3: holders not renewed for their duration, counted up to `clock`, while trusted."""
    if trusted_since is None or clock is None:
        return frozenset()
    return frozenset(u for u, f in holders.items() if clock - max(f.observed, trusted_since) > f.duration)


def decide(
    db_fresh: Iterable[str],
    me: str,
    holders: Mapping[str, LeaseFact],
    gone: Iterable[str],
    trusted_since: float | None,
    watch_clock: float | None,
    now: float,
) -> Decision:
    """The live member set: DB-fresh candidates, minus Lease evidence I can trust, plus myself.

    `holders` maps each MN UUID to the Lease it holds; `gone` are UUIDs whose Lease was released,
    deleted or taken over; `trusted_since` is when my Lease view became trustworthy (None: it is not);
    `watch_clock` is the time up to which my watch is proven current (`OwnLease.watch_clock`).
    """
    db = frozenset(db_fresh)
    out = frozenset(gone) | {me}
    expired = expired_holders(holders, trusted_since, watch_clock)
    lease = frozenset(holders) - expired
    members = (db - expired - frozenset(gone)) | {me}
    overdue = expired_holders(holders, trusted_since, now) - expired
    return Decision(members=members, db=db, lease=lease, expired=(expired & db) - out, overdue=(overdue & db) - out)


class LeaseTable:
    """My copy of the cluster's Leases, by Lease name. Each update returns the UUIDs that lost a Lease."""

    def __init__(self) -> None:
        self._by_name: dict[str, LeaseFact] = {}

    def upsert(self, name: str, holder: str | None, renew_time: str | None, duration: float,
               now: float) -> set[str]:
        """An ADDED or MODIFIED Lease. A changed or cleared holder means the previous one lost it."""
        holder = holder or None
        prev = self._by_name.get(name)
        lost = {prev.holder} if prev and prev.holder and prev.holder != holder else set()
        renewed = prev is None or prev.holder != holder or prev.renew_time != renew_time
        observed = now if renewed else prev.observed  # type: ignore[union-attr]
        self._by_name[name] = LeaseFact(holder, renew_time, duration, observed)
        return lost

    def delete(self, name: str) -> set[str]:
        """A DELETED Lease: its holder lost it."""
        prev = self._by_name.pop(name, None)
        return {prev.holder} if prev and prev.holder else set()

    def resync(self, leases: Iterable[tuple[str, str | None, str | None, float]], now: float) -> set[str]:
        """A fresh list (after a watch restart): apply it, and treat Leases missing from it as deleted."""
        listed = list(leases)
        names = {name for name, *_ in listed}
        lost: set[str] = set()
        for name in [n for n in self._by_name if n not in names]:
            lost |= self.delete(name)
        for name, holder, renew_time, duration in listed:
            lost |= self.upsert(name, holder, renew_time, duration, now)
        return lost

    def holders(self) -> dict[str, LeaseFact]:
        """Held Leases by holder UUID."""
        return {f.holder: f for f in self._by_name.values() if f.holder}


class OwnLease:
    """The state of my own renewals: whether my Lease view can be trusted, and whether I lost my Lease.

    `call_limit` is the longest one renewal attempt can take while this process runs (its call timeouts
    and retry); an attempt lasting longer means the process stood still during it.
    """

    def __init__(self, duration: float, call_limit: float) -> None:
        self.duration = duration
        self.call_limit = call_limit
        self.last_ok: float | None = None  # start of my last successful acquire/renewal
        self.failing_since: float | None = None  # first failed attempt after last_ok
        self.pending_since: float | None = None  # start of the attempt in flight
        self.renewals_trusted_since: float | None = None
        self.watch_synced_since: float | None = None
        self.watch_clock: float | None = None  # start of my latest renewal seen on my watch (rule 2b)
        self._unseen: dict[str, float] = {}  # renewTime I wrote, not yet seen on my watch -> write start
        self._early: dict[str, None] = {}  # renewTimes of my Lease my watch delivered before my write returned

    def attempting(self, now: float) -> None:
        """A renewal starts: if it hangs, the gap up to here is what counts for rule 4."""
        self.pending_since = now

    def succeeded(self, started: float, now: float | None = None, renew_time: str | None = None) -> None:
        """An acquire or renewal that started at `started` succeeded at `now`, writing `renew_time`."""
        if renew_time:
            self._unseen[renew_time] = started
            while len(self._unseen) > 64:  # never echoed (a broken watch): keep the newest
                del self._unseen[next(iter(self._unseen))]
            if renew_time in self._early:  # my watch delivered this write before its answer came back
                del self._early[renew_time]
                self.echoed(renew_time)
        took_too_long = now is not None and now - started > self.call_limit
        if self.failing_since is not None or self.renewals_trusted_since is None:
            self.renewals_trusted_since = now if took_too_long and now is not None else started
        self.failing_since, self.pending_since = None, None
        if not took_too_long or self.last_ok is None:
            self.last_ok = started
        # else: the write reached the server at an unknown moment while I stood still; last_ok stays, so
        # `stalled` sees the whole gap (rule 4).

    def failed(self, now: float) -> None:
        """A renewal failed for want of the API server (not a lost Lease)."""
        if self.failing_since is None:
            start = self.pending_since if self.pending_since is not None else now
            # An attempt that outlived any call: this process stood still during it; the gap runs to now.
            self.failing_since = now if now - start > self.call_limit else start
        self.pending_since = None
        self.renewals_trusted_since = None

    def released(self) -> None:
        """Not holding a Lease (before joining, after fencing or leaving)."""
        self.last_ok = self.failing_since = self.pending_since = self.renewals_trusted_since = None
        self.watch_clock = None
        self._unseen.clear()
        self._early.clear()

    def echoed(self, renew_time: str | None) -> bool:
        """My Lease came by on my watch with `renew_time`: if I wrote it, the watch is current up to then."""
        started = self._unseen.pop(renew_time, None) if renew_time else None
        if started is None:
            if renew_time:  # maybe my write's answer is still on its way: `succeeded` will match it
                self._early[renew_time] = None
                while len(self._early) > 64:
                    del self._early[next(iter(self._early))]
            return False
        self._unseen = {t: s for t, s in self._unseen.items() if s > started}  # older ones cannot come back
        self.watch_clock = started if self.watch_clock is None else max(self.watch_clock, started)
        return True

    def watch_synced(self, now: float) -> None:
        self.watch_synced_since = now

    def watch_broken(self) -> None:
        self.watch_synced_since = None

    def trusted_since(self, now: float) -> float | None:
        """Rule 3: when my Lease view became trustworthy, or None while it is not."""
        if None in (self.renewals_trusted_since, self.watch_synced_since, self.last_ok, self.watch_clock):
            return None
        if now - self.last_ok > self.duration:  # type: ignore[operator]  # renewals hang or stopped
            return None
        if now - self.watch_clock > self.duration:  # type: ignore[operator]  # my watch went quiet or lags
            return None
        return max(self.renewals_trusted_since, self.watch_synced_since)  # type: ignore[type-var]

    def stalled(self, now: float) -> float | None:
        """Rule 4: the renewal gap (seconds) when it outgrew the duration while this process stood still."""
        if self.last_ok is None:
            return None
        if self.failing_since is not None:
            end = self.failing_since
        elif self.pending_since is not None and now - self.pending_since <= self.call_limit:
            end = self.pending_since  # a call in flight, within its time limit: an outage, not a stall
        else:
            end = now
        gap = end - self.last_ok
        return gap if gap > self.duration else None
