"""Small statistics helpers shared by the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(samples: Sequence[float], pct: float) -> float:
    """The `pct` percentile (0-100) of `samples`, by linear interpolation between ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * pct / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Iterable[float]) -> float:
    items = list(values)
    if not items:
        raise ValueError("mean of no values")
    return sum(items) / len(items)


def max_over_mean(loads: Iterable[int]) -> float:
    """How much the most loaded bucket holds relative to a perfectly even share."""
    counts = list(loads)
    return max(counts) / (sum(counts) / len(counts))


def summary(values: Sequence[float], *, worst: str = "max", digits: int = 4) -> dict[str, float]:
    """`{"worst": ..., "mean": ...}` over repeats; `worst` is "max" or "min"."""
    pick = max if worst == "max" else min
    return {"worst": round(pick(values), digits), "mean": round(mean(values), digits)}


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies given in seconds, reported in milliseconds."""
    return {
        "p50_ms": round(percentile(seconds, 50) * 1e3, 4),
        "p99_ms": round(percentile(seconds, 99) * 1e3, 4),
        "mean_ms": round(mean(seconds) * 1e3, 4),
        "count": len(seconds),
    }
