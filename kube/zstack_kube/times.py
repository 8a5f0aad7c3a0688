"""Kubernetes time stamps: metav1.Time (seconds) and metav1.MicroTime, both UTC."""

from __future__ import annotations

import datetime as dt


def now() -> str:
    """Now as a metav1.Time."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time() -> str:
    """Now as a metav1.MicroTime (Lease renewTime, acquireTime)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_rfc3339(ts: float) -> str:
    """A UNIX time stamp as a metav1.Time."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    """A metav1.Time or MicroTime as a UNIX time stamp."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
