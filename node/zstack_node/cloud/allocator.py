"""The host allocator: an atomic conditional UPDATE, no lock of our own, never oversubscribed.

It runs inside the caller's transaction, so the reservation commits together with the VM row
that holds it (or rolls back with it). First one statement takes the host with the most free CPU
among those no concurrent transaction holds (SKIP LOCKED), so concurrent creates spread over the
hosts instead of queueing on the emptiest one. Only if every host that fits is held does it try
the candidates one by one, in random order, waiting for the holders.
"""

from __future__ import annotations

import random

from sqlalchemy.engine import Connection

from zstack_node.cloud import repo
from zstack_node.cloud.jobs import JobFailure

_ROUNDS = 3  # candidate lists re-read after others took the capacity we saw


def allocate(conn: Connection, cpu: int, memory: int, *, pinned: str | None = None,
             exclude: str | None = None) -> str:
    """Reserve `cpu` and `memory` on a Connected host and return its UUID; raise JobFailure if none fits."""
    if pinned is not None:
        if repo.take_capacity(conn, pinned, cpu, memory):
            return pinned
        host = repo.get_host(conn, pinned)
        if host is None:
            raise JobFailure("host_not_found", f"host_uuid: host {pinned} does not exist")
        if host.state != "Connected":
            raise JobFailure("host_disconnected", f"host_uuid: host {pinned} is {host.state}")
        raise JobFailure("no_capacity", f"host_uuid: host {pinned} has no room for {cpu} CPU and {memory} MiB "
                                        f"({host.cpu_capacity - host.cpu_used} CPU, "
                                        f"{host.memory_capacity - host.memory_used} MiB free)")
    host_uuid = repo.take_free_host(conn, cpu, memory, exclude)
    if host_uuid is not None:
        return host_uuid
    for _ in range(_ROUNDS):
        candidates = repo.capacity_candidates(conn, cpu, memory, exclude)
        if not candidates:
            break
        random.shuffle(candidates)
        for candidate in candidates:
            if repo.take_capacity(conn, candidate, cpu, memory):
                return candidate
    raise JobFailure("no_capacity", f"no Connected host has room for {cpu} CPU and {memory} MiB")


def release(conn: Connection, host_uuid: str | None, cpu: int, memory: int) -> None:
    """Give back what `allocate` reserved on `host_uuid`."""
    if host_uuid is not None:
        repo.give_capacity(conn, host_uuid, cpu, memory)
