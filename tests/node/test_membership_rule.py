"""The membership rule (DESIGN.md "Membership, one rule"), on plain facts and fake clocks."""

from zstack_node.membership import LEAVING, RUNNING, MemberRow
from zstack_node.membership_rule import LeaseTable, OwnLease, decide, fresh_rows

ME, A, B = "me", "a", "b"


def row(uuid: str, age: float, state: str = RUNNING) -> MemberRow:
    return MemberRow(uuid, uuid, None, state, age)


def table_with(*holders: str, now: float = 0.0, duration: float = 5.0) -> LeaseTable:
    table = LeaseTable()
    for h in holders:
        table.upsert(f"pod-{h}", h, "t0", duration, now)
    return table


def test_fresh_running_rows_are_candidates():
    rows = [row(A, 1.0), row(B, 4.5), row("c", 0.5, LEAVING)]
    assert fresh_rows(rows, timeout=4.0) == {A}


def test_without_leases_the_db_decides_and_i_count_myself():
    decision = decide({A, B}, ME, {}, (), None, now=100.0)
    assert decision.members == {ME, A, B}


def test_a_lease_not_renewed_for_its_duration_takes_its_holder_out_while_i_am_trusted():
    table = table_with(A, B, now=0.0)
    table.upsert("pod-b", B, "t1", 5.0, now=4.0)  # b renewed, a did not
    decision = decide({A, B}, ME, table.holders(), (), trusted_since=0.0, now=5.5)
    assert decision.members == {ME, B}
    assert decision.expired == {A}
    assert decision.lease == {B}


def test_expiry_counts_nothing_while_my_view_is_not_trusted():
    table = table_with(A, now=0.0)
    assert decide({A}, ME, table.holders(), (), trusted_since=None, now=60.0).members == {ME, A}


def test_expiry_is_counted_from_when_my_view_became_trustworthy():
    table = table_with(A, now=0.0)  # then an API-server outage; trust comes back at t=20
    assert decide({A}, ME, table.holders(), (), trusted_since=20.0, now=24.0).members == {ME, A}
    assert decide({A}, ME, table.holders(), (), trusted_since=20.0, now=25.5).members == {ME}


def test_leases_never_add_an_mn_the_db_does_not_count():
    table = table_with(A, now=0.0)
    assert decide(set(), ME, table.holders(), (), trusted_since=0.0, now=1.0).members == {ME}


def test_an_mn_without_a_lease_i_have_seen_is_judged_by_the_db():
    assert decide({A}, ME, table_with(B).holders(), (), trusted_since=0.0, now=1.0).members == {ME, A}


def test_released_deleted_or_taken_leases_name_their_previous_holder():
    table = table_with(A, B)
    assert table.upsert("pod-a", None, "t1", 5.0, 1.0) == {A}  # released
    assert table.delete("pod-b") == {B}  # deleted
    table.upsert("pod-c", "c1", "t0", 5.0, 1.0)
    assert table.upsert("pod-c", "c2", "t0", 5.0, 1.0) == {"c1"}  # taken over (pod restarted)
    assert decide({A, B, "c1", "c2"}, ME, table.holders(), {A, B, "c1"}, 0.0, 2.0).members == {ME, "c2"}


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
    own = OwnLease(duration=5.0)
    assert own.trusted_since(0.0) is None  # nothing renewed, nothing synced
    own.succeeded(1.0)
    own.watch_synced(1.5)
    assert own.trusted_since(2.0) == 1.5
    own.failed(3.0)
    assert own.trusted_since(3.0) is None
    own.succeeded(20.0)
    assert own.trusted_since(20.0) == 20.0  # trust starts over after the outage
    assert own.trusted_since(26.0) is None  # no renewal for longer than the duration: no evidence


def test_an_api_server_outage_never_means_my_lease_is_lost():
    own = OwnLease(duration=5.0)
    own.succeeded(0.0)
    own.attempting(1.0)
    own.failed(2.0)  # the attempt started at 1.0 failed: the outage began within the duration
    assert own.stalled(30.0) is None
    own.succeeded(31.0)
    assert own.stalled(32.0) is None


def test_a_stall_longer_than_the_duration_means_my_lease_is_lost():
    own = OwnLease(duration=5.0)
    own.succeeded(0.0)
    assert own.stalled(4.0) is None
    assert own.stalled(10.0) == 10.0  # SIGSTOP: no attempt at all for 10 s
    own.attempting(1.0)
    assert own.stalled(10.0) is None  # a call in flight since 1.0 (it has a timeout)
    own.released()
    assert own.stalled(100.0) is None
