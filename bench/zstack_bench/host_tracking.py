"""`zstack-bench hosts`: host tracking at scale on 3 `zstack-node` processes, and its takeover after kill -9.

Setup shortcut: the N hosts are INSERTed straight into the `hosts` table (one statement), not added through
the API, which would take minutes of agent calls at 10,000 hosts; the MNs find them as hosts added by anyone.

1. Start the MNs with `ZSTACK_HOST_PING_INTERVAL=interval`, wait until they agree on one ring, seed the hosts,
   and wait until every host is tracked (the MNs' `zstack_hosts_tracked` add up to N) and stamped by its owner.
2. Over a window of `rounds` intervals: the ping lag per MN and overall (p50, p99, max), the pings sent
   against the N x rounds the interval asks for, and the CPU seconds per second of the MNs and PostgreSQL.
   The lag comes from the MNs' `zstack_host_ping_lag_seconds` histogram (how late each ping was against the
   host's schedule; p50/p99 interpolated inside a bucket, max as the bound of the highest non-empty bucket).
   An MN without that metric (the code before it) is measured from the database instead: every
   `last_ping_at` stamp is read and its gap to the previous stamp of the host, minus the interval, is the lag.
3. kill -9 the MN that owns the most hosts: the time until every survivor's ring drops it (convergence), and
   until every host it owned is stamped `tracked_by` its new ring owner (takeover). Target: takeover at most
   convergence plus one interval, and p99 lag at most one interval.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from zstack_bench.api import ServerCpu, tree_cpu_seconds
from zstack_bench.failover import time_until_dropped, wait_agreed
from zstack_bench.stats import percentile
from zstack_devcluster.localnodes import LocalNode, wait_until
from zstack_node.cloud.settings import CloudSettings
from zstack_node.ring import Ring

LAG = "zstack_host_ping_lag_seconds"
WARMUP_INTERVALS = 3
DB_POLL_S = 0.2

Say = Callable[[str], None]
Buckets = dict[float, float]  # cumulative count by upper bound (le), as Prometheus exports a histogram


def seed_hosts(engine: Engine, count: int) -> list[str]:
    """INSERT `count` Connected hosts with random UUIDs in one statement; their UUIDs."""
    uuids = [uuid.uuid4().hex for _ in range(count)]
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO hosts (uuid, name, cpu_capacity, memory_capacity, state)"
            " SELECT u, 'bench-host-' || n, 64, 262144, 'Connected' FROM unnest(CAST(:u AS varchar[]))"
            " WITH ORDINALITY AS t(u, n)"), {"u": uuids})
    return uuids


def scrape(node: LocalNode) -> dict[str, Any]:
    """The lag histogram (None without the metric), the pings sent and the hosts tracked on one MN."""
    buckets: Buckets = {}
    has_lag, pings, tracked = False, 0.0, 0.0
    for family in text_string_to_metric_families(node.text("/metrics", timeout=10)):
        for sample in family.samples:
            if sample.name == f"{LAG}_bucket":
                has_lag = True
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == "zstack_host_pings_total":
                pings += sample.value
            elif sample.name == "zstack_hosts_tracked":
                tracked = sample.value
    return {"lag": buckets if has_lag else None, "pings": pings, "tracked": tracked}


def bucket_delta(after: Buckets, before: Buckets) -> Buckets:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def bucket_quantile(buckets: Buckets, q: float) -> float | None:
    """Prometheus's histogram_quantile: linear inside the bucket that holds rank q x count."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            share = (rank - below) / (buckets[le] - below) if buckets[le] > below else 1.0
            return lower + (le - lower) * share
        lower, below = le, buckets[le]
    return lower


def bucket_max(buckets: Buckets) -> float | None:
    """The upper bound of the highest non-empty bucket: every observation was at most this."""
    previous = 0.0
    top = None
    for le in sorted(buckets):
        if buckets[le] > previous:
            top = le
        previous = buckets[le]
    return top


def histogram_stats(buckets: Buckets) -> dict[str, Any]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return {"p50_s": rounded(bucket_quantile(buckets, 0.50)), "p99_s": rounded(bucket_quantile(buckets, 0.99)),
            "max_s": rounded(bucket_max(buckets)), "count": int(buckets.get(float("inf"), 0))}


def sample_stats(lags: Sequence[float]) -> dict[str, Any]:
    if not lags:
        return {"p50_s": None, "p99_s": None, "max_s": None, "count": 0}
    return {"p50_s": round(percentile(lags, 50), 4), "p99_s": round(percentile(lags, 99), 4),
            "max_s": round(max(lags), 4), "count": len(lags)}


class StampWatch:
    """Reads every host's last_ping_at and tracked_by every DB_POLL_S: the lag of the code before the metric."""

    def __init__(self, engine: Engine, interval: float) -> None:
        self.engine, self.interval = engine, interval
        self.last: dict[str, Any] = {}
        self.lags: dict[str, list[float]] = {}  # by tracked_by
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(DB_POLL_S):
            with self.engine.connect() as conn:
                rows = list(conn.execute(text("SELECT uuid, last_ping_at, tracked_by FROM hosts")))
            for row in rows:
                before = self.last.get(row.uuid)
                if before is not None and row.last_ping_at is not None and row.last_ping_at != before:
                    gap = (row.last_ping_at - before).total_seconds()
                    self.lags.setdefault(row.tracked_by, []).append(max(0.0, gap - self.interval))
                self.last[row.uuid] = row.last_ping_at

    def __enter__(self) -> StampWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


class Cluster:
    """The benchmark's MN processes, all stopped at the end."""

    def __init__(self, broker_url: str, database_url: str, log_dir: Path, interval: float) -> None:
        self.broker_url, self.database_url, self.log_dir = broker_url, database_url, log_dir
        self.env = {"ZSTACK_HOST_PING_INTERVAL": str(interval)}
        self.nodes: list[LocalNode] = []

    def start(self, count: int) -> list[LocalNode]:
        for n in range(count):
            node = LocalNode(f"hosts-mn{n}", self.broker_url, self.database_url, self.log_dir, env=self.env)
            self.nodes.append(node.start())
        for node in self.nodes:
            node.wait_ready(60)
        return self.nodes

    def close(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.stop(timeout=15)


def wait_tracked(engine: Engine, nodes: Sequence[LocalNode], ring: Ring, hosts: Sequence[str],
                 timeout: float) -> float:
    """Wait until the MNs track N hosts between them and every host is stamped by its owner; the seconds."""
    start = time.monotonic()
    expected = {h: ring.owner(h) for h in hosts}

    def done() -> bool:
        if sum(scrape(n)["tracked"] for n in nodes) != len(hosts):
            return False
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT uuid, tracked_by FROM hosts"))
            return all(expected.get(r.uuid) == r.tracked_by for r in rows)

    wait_until(done, timeout, f"{len(hosts)} hosts to be tracked by their owners", interval=0.2)
    return time.monotonic() - start


def measure_window(engine: Engine, nodes: Sequence[LocalNode], cpu: ServerCpu, seconds: float,
                   interval: float) -> dict[str, Any]:
    """Lag, ping rate and CPU over `seconds` of steady tracking. Without the lag metric, the lag is read from
    the database in a second window of the same length, so that reading does not count in the CPU."""
    before = {n.name: scrape(n) for n in nodes}
    mn_cpu = {n.name: tree_cpu_seconds(n.process.pid) for n in nodes}
    cpu.start()
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    used = cpu.stop()
    mn_cpu = {n.name: tree_cpu_seconds(n.process.pid) - mn_cpu[n.name] for n in nodes}
    after = {n.name: scrape(n) for n in nodes}
    with_metric = all(s["lag"] is not None for s in after.values())
    stamps = StampWatch(engine, interval)
    if not with_metric:
        with stamps:
            time.sleep(seconds)
    per_mn: dict[str, Any] = {}
    overall: Buckets = {}
    for node in nodes:
        hosts = int(after[node.name]["tracked"])
        pings = after[node.name]["pings"] - before[node.name]["pings"]
        entry: dict[str, Any] = {"uuid": node.uuid, "hosts": hosts,
                                 "cpu_s_per_s": round(mn_cpu[node.name] / elapsed, 3),
                                 "pings_per_interval_per_host": round(pings / max(1, hosts) / (elapsed / interval), 3)}
        if with_metric:
            delta = bucket_delta(after[node.name]["lag"], before[node.name]["lag"])
            overall = {le: overall.get(le, 0.0) + c for le, c in delta.items()}
            entry["lag"] = histogram_stats(delta)
        else:
            entry["lag"] = sample_stats(stamps.lags.get(entry["uuid"], []))
        per_mn[node.name] = entry
    lag = histogram_stats(overall) if with_metric else sample_stats([x for v in stamps.lags.values() for x in v])
    hosts = sum(e["hosts"] for e in per_mn.values())
    pings = sum(after[n]["pings"] - before[n]["pings"] for n in after)
    return {
        "seconds": round(elapsed, 2), "lag_source": "metrics" if with_metric else "db_last_ping_at",
        "lag": lag, "per_mn": per_mn,
        "pings_per_interval_per_host": round(pings / max(1, hosts) / (elapsed / interval), 3),
        "cpu_s_per_s": {k: (None if v is None else round(v / elapsed, 3)) for k, v in used.items()},
    }


def takeover(engine: Engine, victim: LocalNode, survivors: Sequence[LocalNode], hosts: Sequence[str],
             timeout: float) -> dict[str, float]:
    """kill -9 `victim`; seconds until every survivor's ring drops it and until its hosts carry their new owner."""
    gone = victim.uuid
    new_ring = Ring.of(n.uuid for n in survivors)
    expected = {h: new_ring.owner(h) for h in hosts}
    seen: dict[str, float] = {}
    killed_at = time.monotonic()

    def watch() -> None:
        while len(seen) < len(expected) and time.monotonic() - killed_at < timeout:
            with engine.connect() as conn:
                rows = list(conn.execute(text("SELECT uuid, tracked_by FROM hosts WHERE uuid = ANY(:h)"),
                                         {"h": list(expected)}))
            now = time.monotonic() - killed_at
            for row in rows:
                if row.tracked_by == expected[row.uuid]:
                    seen.setdefault(row.uuid, now)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    victim.kill()
    watcher.start()
    convergence = time_until_dropped(survivors, gone, killed_at, timeout)
    watcher.join(timeout + 5)
    if len(seen) < len(expected):
        raise TimeoutError(f"{len(expected) - len(seen)} of {len(expected)} hosts of the killed MN were not "
                           f"tracked by their new owner {timeout:g}s after the kill")
    times = sorted(seen.values())
    return {"convergence_s": round(convergence, 3), "takeover_s": round(times[-1], 3),
            "takeover_p50_s": round(percentile(times, 50), 3),
            "takeover_after_convergence_s": round(times[-1] - convergence, 3), "hosts_moved": len(expected)}


def track_and_kill(engine: Engine, nodes: Sequence[LocalNode], broker_url: str, database_url: str, hosts: Sequence[str],
                   interval: float, rounds: int, say: Say) -> dict[str, Any]:
    """On running MNs that track `hosts`: the steady window, kill -9 of the biggest owner, the window after.

    The result's "checks" say whether the targets were met."""
    ring = Ring.of(n.uuid for n in nodes)
    settle = wait_tracked(engine, nodes, ring, hosts, timeout=120 + len(hosts) / 100)
    time.sleep(WARMUP_INTERVALS * interval)  # a steady state to measure, not a wait for a condition
    say(f"hosts: all {len(hosts)} tracked after {settle:.1f}s; measuring {rounds} intervals of {interval:g}s")
    cpu = ServerCpu(broker_url, database_url, [n.process.pid for n in nodes if n.process])
    steady = measure_window(engine, nodes, cpu, rounds * interval, interval)
    say(f"hosts: lag {steady['lag']}; kill -9 the MN that owns the most hosts")
    owned = {n.uuid: [h for h in hosts if ring.owner(h) == n.uuid] for n in nodes}
    victim = max(nodes, key=lambda n: len(owned[n.uuid]))
    survivors = [n for n in nodes if n is not victim]
    failover = takeover(engine, victim, survivors, owned[victim.uuid], timeout=60 + 10 * interval)
    say(f"hosts: {failover}")
    after = measure_window(engine, survivors, ServerCpu(broker_url, database_url,
                                                        [n.process.pid for n in survivors if n.process]),
                           max(5, rounds // 2) * interval, interval)
    p99 = steady["lag"]["p99_s"]
    return {
        "settle_s": round(settle, 2),
        "steady": steady,
        "p99_lag_over_interval": None if p99 is None else round(p99 / interval, 3),
        "failover": failover,
        "takeover_after_convergence_over_interval": round(failover["takeover_after_convergence_s"] / interval, 3),
        "after_failover": after,
        "targets": {"p99_lag_s": interval, "takeover_after_convergence_s": interval,
                    "pings_per_interval_per_host": 0.95},
        "checks": {
            "p99_lag_at_most_interval": p99 is not None and p99 <= interval,
            "every_host_pinged_every_interval": steady["pings_per_interval_per_host"] >= 0.95,
            "takeover_within_convergence_plus_interval": failover["takeover_after_convergence_s"] <= interval,
        },
    }


def run(broker_url: str, database_url: str, *, mns: int = 3, hosts: int = 10_000, interval: float = 1.0,
        rounds: int = 20, log_dir: Path | None = None, progress: Say | None = None) -> dict[str, Any]:
    """The benchmark's JSON object."""
    say = progress or (lambda _m: None)
    scratch = log_dir or Path(tempfile.mkdtemp(prefix="zstack-bench-hosts-"))
    engine = create_engine(database_url, pool_size=2)
    cluster = Cluster(broker_url, database_url, scratch, interval)
    try:
        nodes = cluster.start(mns)
        wait_agreed(nodes, 60)
        uuids = seed_hosts(engine, hosts)
        say(f"hosts: {mns} MNs agree; seeded {hosts} hosts, waiting until each is tracked by its owner")
        result = track_and_kill(engine, nodes, broker_url, database_url, uuids, interval, rounds, say)
    except Exception:
        for node in cluster.nodes:
            say(f"--- log of {node.name} ({node.log_path}):\n{node.tail(15)}")
        raise
    finally:
        cluster.close()
        engine.dispose()
    if log_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "benchmark": "hosts",
        "params": {"mns": mns, "hosts": hosts, "interval_s": interval, "rounds": rounds},
        **result,
        "targets_met": all(result["checks"].values()),
    }


def api_scale_section(rounds: int = 20) -> Callable[[Any], dict[str, Any]]:
    """Host tracking as a section of `zstack-bench api-scale`: on its running MNs and their seeded hosts."""
    def section(ctx: Any) -> dict[str, Any]:
        engine = create_engine(ctx.database_url, pool_size=2)
        try:
            with engine.connect() as conn:
                uuids = [r.uuid for r in conn.execute(text("SELECT uuid FROM hosts"))]
            interval = CloudSettings.from_env().host_ping_interval
            return track_and_kill(engine, list(ctx.nodes), ctx.broker_url, ctx.database_url, uuids, interval,
                                  rounds, ctx.say)
        finally:
            engine.dispose()

    return section
