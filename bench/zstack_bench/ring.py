"""`zstack-bench ring`: balance and key moves of our Ring against jump consistent hash.

Jump consistent hash (Lamping and Veach) spreads keys as evenly as a uniform hash can, so it is
the baseline: every figure is a ratio to it, or to the ideal share, on the same keys in the same
run. Seeds make a run repeatable; the worst and the mean over the seeds are reported.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from zstack_bench.stats import max_over_mean, summary
from zstack_node.ring import DEFAULT_VNODES, Ring

BALANCE_TARGET = 1.05  # ring max/mean at most 1.05x jump hash's
MOVES_TARGET = 1.10  # moved share at most 1.10x the ideal 1/(N+1) or 1/N

_MASK64 = (1 << 64) - 1


def key_hash64(key: str) -> int:
    """A 64-bit hash of a resource UUID (blake2b), the input jump hash needs."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket in [0, buckets) of a 64-bit key."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def random_uuid(rng: random.Random) -> str:
    """A v4 UUID as 32 hex chars, drawn from `rng` so that a seed repeats a run."""
    return uuid.UUID(int=rng.getrandbits(128), version=4).hex


def _owners(ring: Ring, keys: Sequence[str]) -> tuple[list[str], float]:
    """The owner of every key, and the mean lookup cost in seconds."""
    owner = ring.owner
    owner(keys[0])  # build the ring before timing lookups
    start = time.perf_counter()
    result = [owner(k) for k in keys]
    return result, (time.perf_counter() - start) / len(keys)


def _build_seconds(members: Sequence[str], vnodes: int, probe: str) -> float:
    start = time.perf_counter()
    Ring.of(members, vnodes).owner(probe)  # the hash ring is built on first use
    return time.perf_counter() - start


def _moved(before: Sequence[str], after: Sequence[str], changed: str) -> tuple[int, int]:
    """(keys that moved, keys that moved between two MNs other than `changed`)."""
    moved = staying = 0
    for old, new in zip(before, after, strict=True):
        if old != new:
            moved += 1
            if changed not in (old, new):
                staying += 1
    return moved, staying


def run_seed(seed: int, mns: int, keys: int, vnodes: int) -> dict[str, float]:
    """Every figure for one seed."""
    rng = random.Random(seed)
    members = [random_uuid(rng) for _ in range(mns)]
    resources = [random_uuid(rng) for _ in range(keys)]
    ring = Ring.of(members, vnodes)
    build = _build_seconds(members, vnodes, resources[0])
    owners, lookup = _owners(ring, resources)

    hashed = [key_hash64(k) for k in resources]
    start = time.perf_counter()
    buckets = [jump_hash(h, mns) for h in hashed]
    jump_lookup = (time.perf_counter() - start) / keys

    ring_balance = max_over_mean(Counter(owners)[m] for m in members)
    jump_balance = max_over_mean(Counter(buckets)[b] for b in range(mns))

    joiner = random_uuid(rng)
    joined, _ = _owners(ring.with_member(joiner), resources)
    join_moved, join_staying = _moved(owners, joined, joiner)
    leaver = members[rng.randrange(mns)]
    left, _ = _owners(ring.without_member(leaver), resources)
    leave_moved, leave_staying = _moved(owners, left, leaver)
    return {
        "ring_max_over_mean": ring_balance,
        "jump_max_over_mean": jump_balance,
        "balance_ratio": ring_balance / jump_balance,
        "join_moved_share": join_moved / keys,
        "join_moves_ratio": (join_moved / keys) * (mns + 1),
        "leave_moved_share": leave_moved / keys,
        "leave_moves_ratio": (leave_moved / keys) * mns,
        "moved_between_staying": join_staying + leave_staying,
        "lookup_us": lookup * 1e6,
        "jump_lookup_us": jump_lookup * 1e6,
        "build_ms": build * 1e3,
    }


def run(mns: int = 10, keys: int = 100_000, seeds: Sequence[int] = (1, 2, 3, 4, 5),
        vnodes: int = DEFAULT_VNODES, progress: Any = None) -> dict[str, Any]:
    """The benchmark's JSON object."""
    if mns < 2 or keys < 1 or not seeds:
        raise ValueError("need at least 2 MNs, 1 key and 1 seed")
    per_seed = []
    for seed in seeds:
        if progress:
            progress(f"ring: seed {seed}: {mns} MNs, {keys} keys, {vnodes} vnodes")
        per_seed.append(run_seed(seed, mns, keys, vnodes))

    def over_seeds(name: str, worst: str = "max") -> dict[str, float]:
        return summary([s[name] for s in per_seed], worst=worst)

    balance = over_seeds("balance_ratio")
    join, leave = over_seeds("join_moves_ratio"), over_seeds("leave_moves_ratio")
    staying = sum(int(s["moved_between_staying"]) for s in per_seed)
    checks = {
        "balance_ratio": balance["worst"] <= BALANCE_TARGET,
        "join_moves_ratio": join["worst"] <= MOVES_TARGET,
        "leave_moves_ratio": leave["worst"] <= MOVES_TARGET,
        "no_moves_between_staying": staying == 0,
    }
    return {
        "benchmark": "ring",
        "params": {"mns": mns, "keys": keys, "seeds": list(seeds), "vnodes": vnodes},
        "balance_ratio": balance,
        "ring_max_over_mean": over_seeds("ring_max_over_mean"),
        "jump_max_over_mean": over_seeds("jump_max_over_mean"),
        "join_moves_ratio": join,
        "leave_moves_ratio": leave,
        "join_moved_share": over_seeds("join_moved_share"),
        "leave_moved_share": over_seeds("leave_moved_share"),
        "moved_between_staying": staying,
        "lookup_us": over_seeds("lookup_us"),
        "jump_lookup_us": over_seeds("jump_lookup_us"),
        "build_ms": over_seeds("build_ms"),
        "targets": {"balance_ratio": BALANCE_TARGET, "moves_ratio": MOVES_TARGET},
        "checks": checks,
        "targets_met": all(checks.values()),
    }
