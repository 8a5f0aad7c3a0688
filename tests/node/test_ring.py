"""The ring: who owns what, and what moves when membership changes."""

import random
import uuid

import pytest

from zstack_node.ring import EmptyRingError, Ring, RingChange


def uuids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(n)]


MNS = uuids(6, seed=1)
KEYS = uuids(20_000, seed=2)


def test_every_mn_computes_the_same_owner_from_the_same_members():
    a, b = Ring.of(MNS), Ring.of(reversed(MNS))
    assert [a.owner(k) for k in KEYS[:2000]] == [b.owner(k) for k in KEYS[:2000]]
    assert a.epoch == b.epoch


def test_epoch_changes_with_membership():
    ring = Ring.of(MNS)
    assert ring.without_member(MNS[0]).epoch != ring.epoch
    assert ring.without_member(MNS[0]).with_member(MNS[0]).epoch == ring.epoch


def test_a_join_moves_keys_only_to_the_new_mn_and_about_its_share():
    old = Ring.of(MNS[:5])
    new = old.with_member(MNS[5])
    moved = [(old.owner(k), new.owner(k)) for k in KEYS if old.owner(k) != new.owner(k)]
    assert all(to == MNS[5] for _, to in moved), "a key moved between two MNs that both stayed"
    share = len(moved) / len(KEYS)
    assert share == pytest.approx(1 / 6, rel=0.25)


def test_a_leave_moves_only_the_leavers_keys():
    old = Ring.of(MNS)
    new = old.without_member(MNS[2])
    for key in KEYS:
        if old.owner(key) != MNS[2]:
            assert new.owner(key) == old.owner(key)
        else:
            assert new.owner(key) != MNS[2]


def test_load_is_balanced_across_members():
    ring = Ring.of(MNS)
    counts = {mn: 0 for mn in MNS}
    for key in KEYS:
        counts[ring.owner(key)] += 1
    assert max(counts.values()) / (len(KEYS) / len(MNS)) < 1.1


def test_gained_by_names_exactly_the_keys_a_survivor_took_over():
    old = Ring.of(MNS[:3])
    change = RingChange(old, old.without_member(MNS[0]))
    taken = {k for k in KEYS[:3000] if old.owner(k) == MNS[0]}
    gained = {mn: set(change.gained_by(mn, KEYS[:3000])) for mn in MNS[1:3]}
    assert gained[MNS[1]] | gained[MNS[2]] == taken
    assert not gained[MNS[1]] & gained[MNS[2]]
    assert change.left == {MNS[0]} and not change.joined
    assert change.gained_by(MNS[0], KEYS[:100]) == []


def test_an_empty_ring_owns_nothing():
    with pytest.raises(EmptyRingError):
        Ring.of([]).owner(KEYS[0])
