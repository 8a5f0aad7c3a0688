"""The membership rule (docs/ARCHITECTURE.md, "Membership states of one MN"), on plain facts and fake clocks."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from zstack_node.membership.lease_client import LeaseEvent, Outcome, Result
from zstack_node.membership.leases import LeaseMembership
from zstack_node.membership.rule import LeaseTable, OwnLease, can_witness, decide, evictable, running_rows
from zstack_node.membership.table import LEAVING, RUNNING, MemberRow

ME, A, B = "me", "a", "b"


def row(uuid: str, age: float, state: str = RUNNING, continuous_for: float = 60.0) -> MemberRow:
    return MemberRow(uuid, uuid, None, state, age, continuous_for)


def table_with(*holders: str, now: float = 0.0, duration: float = 5.0) -> LeaseTable:
    table = LeaseTable()
    for h in holders:
        table.upsert(f"pod-{h}", h, "t0", duration, now)
    return table


def test_running_rows_are_candidates_fresh_or_stale():
    """A row leaves the ring when it leaves the table, never merely by going stale: readers agree."""
    rows = [row(A, 1.0), row(B, 4.5), row("c", 0.5, LEAVING), row("d", 0.1, "JOINING")]
    assert running_rows(rows) == {A, B}


# Rule 1b, with the defaults: timeout 4 s, so a gap over 2 s breaks a run of heartbeats.
@pytest.mark.parametrize(("my_age", "my_run", "witness"), [
    (0.5, 60.0, True),    # heartbeats continuous for a minute
    (0.5, 4.0, True),     # exactly one timeout of them
    (0.5, 3.9, False),    # back from an outage less than a timeout ago
    (2.0, 60.0, True),    # one heartbeat late: still within the gap
    (2.1, 60.0, False),   # my run is broken now: I am in the outage myself
    (30.0, 60.0, False),  # frozen, or cut off, for a long time
])
def test_i_witness_only_after_a_timeout_of_unbroken_heartbeats(my_age, my_run, witness):
    assert can_witness(row(ME, my_age, continuous_for=my_run), timeout=4.0) is witness


def test_no_row_of_mine_no_witness():
    assert not can_witness(None, timeout=4.0)
    assert evictable([row(A, 30.0)], ME, timeout=4.0) == frozenset()


@pytest.mark.parametrize(("case", "rows", "evicted"), [
    ("a lone silent peer", [row(ME, 0.3), row(A, 0.8), row(B, 4.6)], {B}),
    ("stale JOINING and LEAVING rows too", [row(ME, 0.3), row(A, 9.0, "JOINING"), row(B, 5.0, LEAVING)], {A, B}),
    ("a peer at exactly the timeout", [row(ME, 0.3), row(A, 4.0)], set()),
    ("all stale after a shared outage, my first heartbeat back",
     [row(ME, 0.0, continuous_for=0.0), row(A, 9.0), row(B, 9.0)], set()),
    ("all back, but one never returned: not until a timeout of my heartbeats",
     [row(ME, 0.2, continuous_for=3.0), row(A, 0.4, continuous_for=3.1), row(B, 12.0)], set()),
    ("... and then it is evicted", [row(ME, 0.2, continuous_for=4.2), row(A, 0.4), row(B, 13.2)], {B}),
    ("I am the one cut off: everybody looks stale to me", [row(ME, 6.0), row(A, 6.0), row(B, 6.0)], set()),
    ("I never count myself", [row(ME, 0.3), row(ME + "x", 0.3)], set()),
])
def test_who_may_be_evicted(case, rows, evicted):
    assert evictable(rows, ME, timeout=4.0) == evicted, case


def test_without_leases_the_db_decides_and_i_count_myself():
    decision = decide({A, B}, ME, {}, (), None, None, now=100.0)
    assert decision.members == {ME, A, B}


def test_a_lease_not_renewed_for_its_duration_takes_its_holder_out_while_i_am_trusted():
    table = table_with(A, B, now=0.0)
    table.upsert("pod-b", B, "t1", 5.0, now=4.0)  # b renewed, a did not
    decision = decide({A, B}, ME, table.holders(), (), trusted_since=0.0, watch_clock=5.5, now=5.5)
    assert decision.members == {ME, B}
    assert decision.expired == {A}
    assert decision.lease == {B}


def test_expiry_counts_nothing_while_my_view_is_not_trusted():
    table = table_with(A, now=0.0)
    assert decide({A}, ME, table.holders(), (), None, None, now=60.0).members == {ME, A}


def test_expiry_is_counted_from_when_my_view_became_trustworthy():
    table = table_with(A, now=0.0)  # then an API-server outage; trust comes back at t=20
    assert decide({A}, ME, table.holders(), (), 20.0, watch_clock=24.0, now=24.0).members == {ME, A}
    assert decide({A}, ME, table.holders(), (), 20.0, watch_clock=25.5, now=25.5).members == {ME}


def test_leases_never_add_an_mn_the_db_does_not_count():
    table = table_with(A, now=0.0)
    assert decide(set(), ME, table.holders(), (), 0.0, 1.0, now=1.0).members == {ME}


def test_an_mn_without_a_lease_i_have_seen_is_judged_by_the_db():
    assert decide({A}, ME, table_with(B).holders(), (), 0.0, 1.0, now=1.0).members == {ME, A}


def test_released_deleted_or_taken_leases_name_their_previous_holder():
    table = table_with(A, B)
    assert table.upsert("pod-a", None, "t1", 5.0, 1.0) == {A}  # released
    assert table.delete("pod-b") == {B}  # deleted
    table.upsert("pod-c", "c1", "t0", 5.0, 1.0)
    assert table.upsert("pod-c", "c2", "t0", 5.0, 1.0) == {"c1"}  # taken over (pod restarted)
    assert decide({A, B, "c1", "c2"}, ME, table.holders(), {A, B, "c1"}, 0.0, 2.0, 2.0).members == {ME, "c2"}


def test_a_renewal_changes_no_membership_fact():
    table = table_with(A)
    assert table.upsert("pod-a", A, "t1", 5.0, 1.0) == set()
    assert table.holders()[A].observed == 1.0
    assert table.upsert("pod-a", A, "t1", 5.0, 2.0) == set()  # a repeat: not a renewal
    assert table.holders()[A].observed == 1.0


def test_a_relist_treats_missing_leases_as_deleted():
    table = table_with(A, B)
    assert table.resync([("pod-b", B, "t1", 5.0)], now=3.0) == {A}
    assert set(table.holders()) == {B}


def test_own_renewals_decide_trust():
    own = OwnLease(duration=5.0, call_limit=3.5)
    assert own.trusted_since(0.0) is None  # nothing renewed, nothing synced
    own.succeeded(1.0, 1.01, "r1")
    own.watch_synced(1.5)
    assert own.trusted_since(2.0) is None  # my renewal has not come back on the watch yet
    assert own.echoed("r1")
    assert own.trusted_since(2.0) == 1.5
    own.failed(3.0)
    assert own.trusted_since(3.0) is None
    own.succeeded(20.0, 20.01, "r2")
    own.echoed("r2")
    assert own.trusted_since(20.0) == 20.0  # trust starts over after the outage
    assert own.trusted_since(26.0) is None  # no renewal for longer than the duration: no evidence


def test_an_api_server_outage_never_means_my_lease_is_lost():
    own = OwnLease(duration=5.0, call_limit=3.5)
    own.succeeded(0.0)
    own.attempting(1.0)
    own.failed(2.0)  # the attempt started at 1.0 failed: the outage began within the duration
    assert own.stalled(30.0) is None
    own.succeeded(31.0)
    assert own.stalled(32.0) is None


def test_a_stall_longer_than_the_duration_means_my_lease_is_lost():
    own = OwnLease(duration=5.0, call_limit=3.5)
    own.succeeded(0.0)
    assert own.stalled(4.0) is None
    assert own.stalled(10.0) == 10.0  # SIGSTOP: no attempt at all for 10 s
    own.attempting(1.0)
    assert own.stalled(4.0) is None  # a call in flight since 1.0, within its time limit
    own.released()
    assert own.stalled(100.0) is None


def renewing(own: OwnLease, times: list[float], echoed_until: float) -> None:
    """Renew at each time (10 ms calls); the watch delivers my renewals only up to `echoed_until`."""
    for t in times:
        own.attempting(t)
        own.succeeded(t, t + 0.01, f"r{t}")
        if t <= echoed_until:
            own.echoed(f"r{t}")


# ---- finding 1: a stalled watch never makes me trust my Lease view ------------------------------

def test_a_silent_watch_expires_nobody_and_ends_my_trust():
    own, table = OwnLease(duration=5.0, call_limit=3.5), table_with(A, now=0.0)
    own.watch_synced(0.0)
    # My renewals keep succeeding every second, but the watch went silent after t=3 (half-dead TCP).
    renewing(own, [float(t) for t in range(0, 12)], echoed_until=3.0)
    assert own.watch_clock == 3.0
    # t=7.5: still trusted (my last echo is 4.5 s old), A looks expired by now but not by the watch clock.
    decision = decide({A}, ME, table.holders(), (), own.trusted_since(7.5), own.watch_clock, now=7.5)
    assert decision.members == {ME, A} and decision.expired == set() and decision.overdue == {A}
    # t=8.5: my latest echo is older than the duration: not trusted, Leases decide nothing.
    assert own.trusted_since(8.5) is None
    assert decide({A}, ME, table.holders(), (), own.trusted_since(60.0), own.watch_clock, 60.0).members == {ME, A}


def test_my_renewal_coming_back_proves_the_watch_current_and_then_expiry_counts():
    own, table = OwnLease(duration=5.0, call_limit=3.5), table_with(A, now=0.0)
    own.watch_synced(0.0)
    renewing(own, [float(t) for t in range(0, 7)], echoed_until=6.0)  # A stopped renewing at 0
    decision = decide({A}, ME, table.holders(), (), own.trusted_since(6.1), own.watch_clock, now=6.1)
    assert decision.members == {ME} and decision.expired == {A} and decision.overdue == set()


def test_an_echo_of_an_older_renewal_moves_the_clock_only_to_that_renewal():
    own = OwnLease(duration=5.0, call_limit=3.5)
    renewing(own, [1.0, 2.0, 3.0], echoed_until=0.0)
    assert own.echoed("r2.0") and own.watch_clock == 2.0
    assert not own.echoed("r1.0")  # older than what came back: forgotten
    assert not own.echoed("someone else's renewTime")
    assert own.echoed("r3.0") and own.watch_clock == 3.0


def test_an_echo_that_arrives_before_my_write_returns_still_counts():
    """On a loaded machine the watch can deliver my renewal before the renewal call's answer is read."""
    own = OwnLease(duration=5.0, call_limit=3.5)
    own.watch_synced(0.0)
    own.succeeded(0.0, 0.01, "r0.0")
    assert own.echoed("r0.0") and own.trusted_since(0.5) is not None
    own.attempting(1.0)
    assert not own.echoed("r1.0")  # not known yet: my write's answer is still on its way
    own.succeeded(1.0, 1.2, "r1.0")
    assert own.watch_clock == 1.0
    assert own.trusted_since(5.5) is not None, "the early echo must keep my Lease view trusted"


# ---- finding 4: a stall during an in-flight renewal is a stall ----------------------------------

def test_a_renewal_that_fails_after_a_stall_means_my_lease_is_lost():
    own = OwnLease(duration=5.0, call_limit=3.5)
    own.succeeded(0.0, 0.01, "r0")
    own.attempting(1.0)  # SIGSTOP arrives now, SIGCONT at 12: the call then times out
    assert own.stalled(12.0) == 12.0  # the watchdog fences before the call even returns
    own.failed(12.5)
    assert own.stalled(12.5) == 12.5


def test_a_renewal_that_succeeds_after_a_stall_means_my_lease_is_lost():
    own = OwnLease(duration=5.0, call_limit=3.5)
    own.succeeded(0.0, 0.01, "r0")
    own.attempting(1.0)
    own.succeeded(1.0, 12.0, "r1")  # the answer was read after SIGCONT: when it was written is unknown
    assert own.stalled(12.0) == 12.0


def test_a_renewal_that_times_out_within_its_limit_is_an_outage_not_a_stall():
    own = OwnLease(duration=5.0, call_limit=3.5)
    own.succeeded(0.0, 0.01, "r0")
    own.attempting(4.0)
    own.failed(6.5)  # a 2.5 s timeout: the API server is out of reach
    assert own.stalled(60.0) is None


def test_a_renewal_call_that_outlives_its_limit_leaves_me_stalled():
    class SlowApi:
        def renew(self, holder: str) -> Result:
            time.sleep(0.3)  # the process stood still with the call in flight
            return Result(Outcome.FAILED, "read timed out")

    async def scenario() -> LeaseMembership:
        leases = LeaseMembership(SimpleNamespace(lease_duration=5.0, lease_name="pod-me"))  # type: ignore[arg-type]
        leases.own = OwnLease(duration=0.2, call_limit=0.1)
        leases._api = SlowApi()  # type: ignore[assignment]
        leases.holder = "me"
        leases.own.succeeded(time.monotonic(), None, "r0")
        assert (await leases.renew()).outcome is Outcome.FAILED  # type: ignore[union-attr]
        return leases

    leases = asyncio.run(scenario())
    assert leases.own.stalled(time.monotonic()) is not None


# ---- finding 5: "broken" travels through the same queue as SYNCED -------------------------------

def test_a_list_taken_before_the_watch_broke_never_marks_it_synced_after():
    async def scenario() -> LeaseMembership:
        leases = LeaseMembership(SimpleNamespace(lease_duration=5.0, lease_name="pod-me"))  # type: ignore[arg-type]
        emit, broken = leases.watch_callbacks(asyncio.get_running_loop())
        watch = threading.Thread(target=lambda: (emit(LeaseEvent("SYNCED")), broken("connection reset")))
        watch.start()
        watch.join()
        await asyncio.sleep(0)
        while not leases.events.empty():
            leases.apply(leases.events.get_nowait())
        return leases

    leases = asyncio.run(scenario())
    assert leases.own.watch_synced_since is None


def test_my_renewal_on_the_watch_or_in_a_relist_moves_the_watch_clock():
    leases = LeaseMembership(SimpleNamespace(lease_duration=5.0, lease_name="pod-me"))  # type: ignore[arg-type]
    leases.own.succeeded(1.0, 1.01, "r1")
    leases.own.succeeded(2.0, 2.01, "r2")
    leases.apply(LeaseEvent("MODIFIED", "pod-other", "x", "r2", 5.0))  # not my Lease: proves nothing
    assert leases.watch_clock() is None
    leases.apply(LeaseEvent("SYNCED", items=(("pod-me", "me", "r1", 5.0),)))
    assert leases.watch_clock() == 1.0
    leases.apply(LeaseEvent("MODIFIED", "pod-me", "me", "r2", 5.0))
    assert leases.watch_clock() == 2.0


# ---- the question: Lease expiry is acted on through the DB, and only when trusted ---------------

def test_expired_candidates_are_named_for_eviction_through_the_db():
    table = table_with(A, B, "c", now=0.0)
    table.upsert("pod-b", B, "t1", 5.0, now=4.0)
    # a: expired and a DB candidate (it may still reach the DB): evict its row. c: expired but no fresh
    # row (the DB path handles it). me: never. gone: already out.
    decision = decide({A, B, ME, "c-gone"}, ME, {**table.holders(), ME: table.holders()[A]}, {"c-gone"}, 0.0,
                      watch_clock=6.0, now=6.0)
    assert decision.expired == {A}
    assert decision.members == {ME, B}


def test_a_whole_api_server_outage_names_nobody_for_eviction():
    own, table = OwnLease(duration=5.0, call_limit=3.5), table_with(A, B, now=0.0)
    own.watch_synced(0.0)
    renewing(own, [0.0, 1.0], echoed_until=1.0)
    for t in range(2, 40):  # every renewal fails quickly; the watch breaks too
        own.attempting(float(t))
        own.failed(t + 0.01)
    own.watch_broken()
    for now in (5.0, 20.0, 39.0):
        decision = decide({A, B}, ME, table.holders(), (), own.trusted_since(now), own.watch_clock, now)
        assert decision.members == {ME, A, B} and not decision.expired and not decision.overdue
        assert own.stalled(now) is None  # and nobody fences: DB heartbeats alone decide
