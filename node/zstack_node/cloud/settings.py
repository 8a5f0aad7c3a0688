"""Tuning of the cloud services, read once from environment variables and checked.

They tune the simulated hypervisors, the host tracker and the job sweeper. A bad value is refused
at start with the variable named, like the node's own settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from zstack_node.errors import ConfigError


@dataclass(frozen=True)
class CloudSettings:
    sim_latency: float = 0.005  # seconds per simulated agent call
    sim_failure_rate: float = 0.0  # probability that an agent call fails
    sim_ping_failure_rate: float = 0.0  # probability that a host ping fails
    host_ping_interval: float = 1.0  # seconds between pings of each host this MN owns
    host_ping_failures: int = 3  # failed pings in a row before a host is Disconnected
    job_sweep_interval: float = 2.0  # seconds between sweeps for abandoned jobs
    job_pending_grace: float = 10.0  # seconds a Pending job may wait for its message before it is swept
    api_max_long_polls: int = 256  # requests that may wait on a job at once on one MN (?wait=); more get 429
    job_retention: float = 7 * 86400.0  # seconds ended jobs and destroyed VMs are kept before they are purged
    idempotency_retention: float = 86400.0  # seconds an Idempotency-Key is remembered
    purge_interval: float = 60.0  # seconds between purges of what outlived its retention
    purge_batch: int = 500  # rows read (and at most deleted) per purge statement

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> CloudSettings:
        """Read ZSTACK_<FIELD> for every field; raise ConfigError naming the first bad one."""
        values: dict[str, float | int] = {}
        for name, default in vars(cls()).items():
            var = f"ZSTACK_{name.upper()}"
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                values[name] = type(default)(raw)
            except ValueError:
                kind = "a whole number" if isinstance(default, int) else "a number"
                raise ConfigError(f"{var}={raw!r} is not {kind} (default {default})") from None
        return cls(**values).validate()

    def validate(self) -> CloudSettings:
        for name in ("sim_failure_rate", "sim_ping_failure_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"ZSTACK_{name.upper()}: must be a probability between 0 and 1")
        if self.sim_latency < 0:
            raise ConfigError("ZSTACK_SIM_LATENCY: must not be negative")
        for name in ("host_ping_interval", "job_sweep_interval", "job_pending_grace", "job_retention",
                     "idempotency_retention", "purge_interval"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"ZSTACK_{name.upper()}: must be a positive, finite number of seconds")
        for name in ("host_ping_failures", "api_max_long_polls", "purge_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ZSTACK_{name.upper()}: must be at least 1")
        if self.idempotency_retention > self.job_retention:
            raise ConfigError("ZSTACK_IDEMPOTENCY_RETENTION: must not exceed ZSTACK_JOB_RETENTION, or a retried "
                              "request could find its key but not its job")
        return self
