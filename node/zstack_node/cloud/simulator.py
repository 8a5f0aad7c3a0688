"""The simulated host agent, like ZStack's simulator plugin: control logic is real, hypervisors are not.

- Every agent call (connect, start, stop, reboot, migrate, destroy) sleeps `ZSTACK_SIM_LATENCY`
  seconds (default 0.005) and fails with probability `ZSTACK_SIM_FAILURE_RATE` (default 0).
- Pings fail for hosts listed in the `sim_host_faults` table (tests insert rows there: the fault
  lives with the simulated host, so every MN sees it), and at random with `ZSTACK_SIM_PING_FAILURE_RATE`.
Agent calls are idempotent: starting a started VM succeeds, as a re-driven job needs.
"""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import text
from sqlalchemy.engine import Connection

from zstack_node.cloud.settings import CloudSettings


class AgentError(Exception):
    """The simulated agent refused or failed an operation."""


class Simulator:
    """One MN's view of the simulated agents."""

    def __init__(self, tuning: CloudSettings) -> None:
        self.latency = tuning.sim_latency
        self.failure_rate = tuning.sim_failure_rate
        self.ping_failure_rate = tuning.sim_ping_failure_rate

    async def call(self, host_uuid: str, operation: str, vm_uuid: str | None = None) -> None:
        """Run `operation` on the agent of `host_uuid`; raise AgentError on a simulated failure."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.failure_rate and random.random() < self.failure_rate:
            target = f" for VM {vm_uuid}" if vm_uuid else ""
            raise AgentError(f"simulated agent failure: {operation}{target} on host {host_uuid}")

    async def ping(self, hosts: list[str], faulty: set[str]) -> dict[str, bool]:
        """Ping every host at once; `faulty` are the hosts whose simulated agent does not answer."""
        if self.latency:
            await asyncio.sleep(self.latency)
        rate = self.ping_failure_rate
        return {h: h not in faulty and not (rate and random.random() < rate) for h in hosts}


def faulty_hosts(conn: Connection) -> set[str]:
    return {r.host_uuid for r in conn.execute(text("SELECT host_uuid FROM sim_host_faults WHERE ping_fails"))}
