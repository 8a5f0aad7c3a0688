"""The membership rule in one pure place (DESIGN.md "Membership, one rule"). No I/O, no clocks of its own.

The rule implemented here:

1. DB: an MN is a candidate while its row is RUNNING and its heartbeat is fresh by the database's clock.
   A stale row is evicted by the node after suspect-then-fence (node.py), not here.
2. Leases (only when running in Kubernetes) can only take candidates out, never add them:
   a. a Lease released (holderIdentity cleared), deleted, or taken over by another holder takes its
      previous holder out at once and for good (UUIDs are never reused) - see `LeaseTable`;
   b. a Lease held by X that I have not seen renewed for its leaseDurationSeconds takes X out, the time
      counted from the later of my last observation and the moment my Lease view became trustworthy;
   c. an MN holding no Lease I have seen is judged by its DB row alone (an MN outside Kubernetes, or a
      Lease my watch has not delivered yet: the joiner creates its Lease before its row, so this lasts
      milliseconds).
3. Trust: evidence from a source this MN cannot reach counts for nothing. Expiry (2b) counts only while
   my own renewals succeed (the last one within the Lease duration, no failure since) and my watch is
   synced. Otherwise Leases decide nothing, and DB heartbeats alone decide - an API-server outage never
   makes MNs evict each other.
4. Self-fencing on my own Lease (see `OwnLease`): my Lease is lost - stop serving, rejoin under a new
   UUID - when a renewal finds it deleted (404) or held by another holder, or when my renewal gap grew
   past the duration *before any renewal attempt failed* (the process stalled: SIGSTOP, a long GC
   pause), because others could see it expire. Renewals that fail because the API server is
   unreachable (connection errors, timeouts, 5xx, 429, ...) fence nothing: they only end the trust of 3.
5. I always count myself while I can prove I am alive (node.py fences me otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .membership import RUNNING, MemberRow


@dataclass(frozen=True)
class LeaseFact:
    """What I know of one Lease: its holder (None when released), and when I saw it renewed."""

    holder: str | None
    renew_time: str | None  # spec.renewTime as the API server returned it; compared, never parsed
    duration: float  # spec.leaseDurationSeconds
    observed: float  # my monotonic time when I first saw this holder with this renewTime


@dataclass(frozen=True)
class Decision:
    """The live member set, and the counts by source for the metrics."""

    members: frozenset[str]
    db: frozenset[str]  # fresh RUNNING rows
    lease: frozenset[str]  # holders of unexpired Leases
    expired: frozenset[str]  # candidates taken out by Lease expiry (2b)


def fresh_rows(rows: Iterable[MemberRow], timeout: float) -> frozenset[str]:
    """Rule 1: RUNNING rows whose heartbeat is not older than the timeout."""
    return frozenset(r.uuid for r in rows if r.state == RUNNING and r.age <= timeout)


def expired_holders(holders: Mapping[str, LeaseFact], trusted_since: float | None, now: float) -> frozenset[str]:
    """Rule 2b under rule 3: holders not renewed for their duration while my view was trustworthy."""
    if trusted_since is None:
        return frozenset()
    return frozenset(u for u, f in holders.items() if now - max(f.observed, trusted_since) > f.duration)


def decide(
    db_fresh: Iterable[str],
    me: str,
    holders: Mapping[str, LeaseFact],
    gone: Iterable[str],
    trusted_since: float | None,
    now: float,
) -> Decision:
    """The live member set: DB-fresh candidates, minus Lease evidence I can trust, plus myself.

    `holders` maps each MN UUID to the Lease it holds; `gone` are UUIDs whose Lease was released,
    deleted or taken over; `trusted_since` is when my Lease view became trustworthy (None: it is not).
    """
    db = frozenset(db_fresh)
    expired = expired_holders(holders, trusted_since, now)
    lease = frozenset(holders) - expired
    members = (db - expired - frozenset(gone)) | {me}
    return Decision(members=members, db=db, lease=lease, expired=expired & db)


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

    def holder_of(self, name: str) -> str | None:
        fact = self._by_name.get(name)
        return fact.holder if fact else None


class OwnLease:
    """The state of my own renewals: whether my Lease view can be trusted, and whether I lost my Lease."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.last_ok: float | None = None  # my last successful acquire/renewal
        self.failing_since: float | None = None  # first failed attempt after last_ok
        self.pending_since: float | None = None  # start of the attempt in flight
        self.renewals_trusted_since: float | None = None
        self.watch_synced_since: float | None = None

    def attempting(self, now: float) -> None:
        """A renewal starts: if it hangs, the gap up to here is what counts for rule 4."""
        self.pending_since = now

    def succeeded(self, now: float) -> None:
        if self.failing_since is not None or self.renewals_trusted_since is None:
            self.renewals_trusted_since = now
        self.last_ok, self.failing_since, self.pending_since = now, None, None

    def failed(self, now: float) -> None:
        """A renewal failed for want of the API server (not a lost Lease)."""
        if self.failing_since is None:
            self.failing_since = self.pending_since if self.pending_since is not None else now
        self.pending_since = None
        self.renewals_trusted_since = None

    def released(self) -> None:
        """Not holding a Lease (before joining, after fencing or leaving)."""
        self.last_ok = self.failing_since = self.pending_since = self.renewals_trusted_since = None

    def watch_synced(self, now: float) -> None:
        self.watch_synced_since = now

    def watch_broken(self) -> None:
        self.watch_synced_since = None

    def trusted_since(self, now: float) -> float | None:
        """Rule 3: when my Lease view became trustworthy, or None while it is not."""
        if self.renewals_trusted_since is None or self.watch_synced_since is None or self.last_ok is None:
            return None
        if now - self.last_ok > self.duration:  # renewals hang or stopped: no news is no evidence
            return None
        return max(self.renewals_trusted_since, self.watch_synced_since)

    def stalled(self, now: float) -> float | None:
        """Rule 4: the renewal gap (seconds) when it outgrew the duration before any attempt failed."""
        if self.last_ok is None:
            return None
        end = next((t for t in (self.failing_since, self.pending_since) if t is not None), now)
        gap = end - self.last_ok
        return gap if gap > self.duration else None
