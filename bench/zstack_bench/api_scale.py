"""`zstack-bench api-scale`: the REST API at scale (10k hosts, 100k VMs, 3 MNs), in one run.

Setup shortcut (documented, untimed): one MN starts to create the schema and stops; then the hosts
and the VMs are seeded straight into PostgreSQL with COPY, the VMs Running on their hosts with
cpu_used/memory_used matching, so capacity is consistent. Every timed phase goes through HTTP:

1. floor: raw pika round trip p50 (RawClient against the `bus` benchmark's raw echo peer) and a raw
   psycopg2 single-row INSERT + commit p50 on the same servers; floor = simulated agent latency + both.
2. jobs: `jobs` VM creates at `concurrency` in flight, round-robin over the MNs, at 1 MN then at
   `mns` MNs (fresh processes each): jobs/s, job latency p50/p99 against the floor, and CPU ms per
   job per part (MNs, RabbitMQ, PostgreSQL, by ServerCpu over the timed phase; idle CPU apart).
3. reads (at `mns` MNs): GET /v1/vms/{uuid} p99 over random seeded UUIDs, and the list walk:
   GET /v1/vms?limit=N following `continue` until it is absent (N = 100 and 1000), per-page p50/p99,
   rows seen against the VM count, the MN's RSS before and after.
4. storm: `storm` concurrent creates over at most `connections` open requests, each with its own
   Idempotency-Key (kept across its retries), retried on transport errors and 503/429 (Retry-After).
   Then every accepted job is awaited in SQL: succeeded, failed by code, lost, doubled (a storm name
   on more than one VM) and hosts over capacity or with cpu_used/memory_used unlike their VMs' sum;
   the accepting request's latency apart from the time since the storm began (client queueing), and
   the MNs' swept jobs (Pending past the grace: "message lost") and stale writes from /metrics.

Extra sections (e.g. host tracking, takeover after kill -9) plug in through `run(sections=...)`: each
gets the running `mns`-MN cluster last, and its dict lands under its name, its "checks" merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import random
import secrets
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2
from sqlalchemy.engine import make_url

from zstack_bench.api import ApiDriver, Configuration, Outcome, Phase, ServerCpu, listening_pid
from zstack_bench.bus import RawClient
from zstack_bench.peers import peer
from zstack_bench.stats import latency_summary, percentile
from zstack_node.cloud.settings import CloudSettings

Say = Callable[[str], None]
HOST_CPU, HOST_MEMORY = 64, 262_144
SEED_VM_CPU, SEED_VM_MEMORY = 2, 4096
NEW_VM_CPU, NEW_VM_MEMORY = 1, 1024
PAGE_LIMITS = (100, 1000)
FLOOR_SAMPLES, FLOOR_WARMUP = 300, 30
IDLE_WINDOW_S = 3.0
STORM_ATTEMPTS = 8  # per create: transport errors and 503/429 answers
STORM_REQUEST_TIMEOUT_S = 120.0
JOB_WAIT_S = 600.0  # an accepted storm job not ended by then is lost
JOB_STALL_S = 120.0  # ... or when no job ended for this long


@dataclass
class Scale:
    """The run's sizes."""

    mns: int = 3
    hosts: int = 10_000
    vms: int = 100_000
    storm: int = 10_000
    jobs: int = 2000
    gets: int = 2000
    concurrency: int = 32
    connections: int = 384
    seed: int = 16

    def check(self) -> None:
        """Refuse sizes whose seeded VMs would leave too little room for the timed creates."""
        per_host = math.ceil(self.vms / self.hosts)
        free = self.hosts * HOST_CPU - self.vms * SEED_VM_CPU
        needed = (2 * self.jobs + self.storm) * NEW_VM_CPU
        if per_host * SEED_VM_CPU > HOST_CPU or free < 2 * needed:
            raise ValueError(f"{self.vms} VMs on {self.hosts} hosts of {HOST_CPU} CPUs leave {free} CPUs free; "
                             f"the timed creates need {needed} (twice that wanted): add hosts")


@dataclass
class ScaleCluster:
    """What an extra section gets: the running MNs (`nodes`), their servers, the API token, a logger."""

    broker_url: str
    database_url: str
    nodes: Sequence[Any]
    token: str
    log_dir: Path
    say: Say
    seed: int


Section = Callable[[ScaleCluster], dict[str, Any]]


# -- PostgreSQL: seeding and checks ---------------------------------------------------------------------


def dsn(database_url: str) -> str:
    """A libpq URI for psycopg2 from the SQLAlchemy URL the MNs use."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _uuid(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _copy(cur: Any, table: str, columns: str, lines: list[str]) -> None:
    cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(lines)))


def seed_rows(database_url: str, scale: Scale, rng: random.Random) -> list[str]:
    """COPY the hosts and the Running VMs (VM i on host i mod hosts); return the VM UUIDs."""
    hosts = [_uuid(rng) for _ in range(scale.hosts)]
    vms = [_uuid(rng) for _ in range(scale.vms)]
    per_host = Counter(i % scale.hosts for i in range(scale.vms))
    base = datetime.now(UTC) - timedelta(days=1)
    host_lines = [f"{h}\tscale-host-{i}\t{HOST_CPU}\t{per_host[i] * SEED_VM_CPU}\t{HOST_MEMORY}\t"
                  f"{per_host[i] * SEED_VM_MEMORY}\tConnected\t{(base + timedelta(milliseconds=i)).isoformat()}\n"
                  for i, h in enumerate(hosts)]
    vm_lines = [f"{v}\tscale-vm-{i}\t{SEED_VM_CPU}\t{SEED_VM_MEMORY}\t{hosts[i % scale.hosts]}\tRunning\t"
                f"{(base + timedelta(milliseconds=i)).isoformat()}\n" for i, v in enumerate(vms)]
    with closing(psycopg2.connect(dsn(database_url))) as conn, conn, conn.cursor() as cur:
        _copy(cur, "hosts", "uuid, name, cpu_capacity, cpu_used, memory_capacity, memory_used, state, created_at",
              host_lines)
        _copy(cur, "vm_instances", "uuid, name, cpu, memory, host_uuid, state, created_at", vm_lines)
    with closing(psycopg2.connect(dsn(database_url))) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE hosts; ANALYZE vm_instances")
    return vms


def sql_one(database_url: str, query: str, args: Sequence[Any] = ()) -> Any:
    """The first column of the first row of `query`."""
    with closing(psycopg2.connect(dsn(database_url))) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchone()[0]


def capacity_report(database_url: str) -> dict[str, int]:
    """Hosts over capacity, and hosts whose cpu_used/memory_used differ from their live VMs' sums."""
    over = sql_one(database_url, "SELECT count(*) FROM hosts WHERE cpu_used > cpu_capacity"
                                 " OR memory_used > memory_capacity")
    inconsistent = sql_one(database_url, """
        SELECT count(*) FROM hosts h LEFT JOIN (
            SELECT host_uuid, sum(cpu) AS cpu, sum(memory) AS memory FROM vm_instances
            WHERE state <> 'Destroyed' AND host_uuid IS NOT NULL GROUP BY host_uuid) v ON v.host_uuid = h.uuid
        WHERE h.cpu_used <> coalesce(v.cpu, 0) OR h.memory_used <> coalesce(v.memory, 0)""")
    return {"hosts_over_capacity": over, "hosts_used_unlike_their_vms": inconsistent}


# -- the floor: raw pika and raw psycopg2 on the same servers --------------------------------------------


def pika_round_trips(broker_url: str, samples: int) -> list[float]:
    """Raw pika request/reply round trips against the `bus` benchmark's raw echo peer process."""
    tag = uuid.uuid4().hex[:12]
    echo, sink = f"zstack.bench.scale.echo.{tag}", f"zstack.bench.scale.sink.{tag}"
    with peer("zstack_bench.bus_peers", ["raw", "--url", broker_url, "--echo-queue", echo, "--sink-queue", sink,
                                         "--count", "1"]):
        client = RawClient(broker_url, echo, sink)
        try:
            body = json.dumps({"job": uuid.uuid4().hex, "resource": uuid.uuid4().hex}).encode()
            for _ in range(FLOOR_WARMUP):
                client.call(body)
            return [_timed(lambda: client.call(body)) for _ in range(samples)]
        finally:
            client.close()


def psycopg2_commits(database_url: str, samples: int) -> list[float]:
    """Raw psycopg2 single-row INSERT + commit into a scratch table shaped like a small job row."""
    table = f"zstack_bench_floor_{uuid.uuid4().hex[:8]}"
    with closing(psycopg2.connect(dsn(database_url))) as conn:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id varchar(32) PRIMARY KEY, note jsonb,"
                        " at timestamptz DEFAULT clock_timestamp())")
        conn.commit()
        try:
            def insert() -> None:
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} (id, note) VALUES (%s, %s)", (uuid.uuid4().hex, '{"a": 1}'))
                conn.commit()

            for _ in range(FLOOR_WARMUP):
                insert()
            return [_timed(insert) for _ in range(samples)]
        finally:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE {table}")
            conn.commit()


def _timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_floor(broker_url: str, database_url: str, samples: int = FLOOR_SAMPLES) -> dict[str, Any]:
    """Agent latency + one raw pika round trip p50 + one raw psycopg2 commit p50, in ms."""
    agent_ms = CloudSettings.from_env().sim_latency * 1e3
    pika_ms = percentile(pika_round_trips(broker_url, samples), 50) * 1e3
    pg_ms = percentile(psycopg2_commits(database_url, samples), 50) * 1e3
    return {"agent_ms": round(agent_ms, 3), "pika_round_trip_p50_ms": round(pika_ms, 3),
            "psycopg2_commit_p50_ms": round(pg_ms, 3), "floor_ms": round(agent_ms + pika_ms + pg_ms, 3),
            "samples": samples}


# -- HTTP helpers --------------------------------------------------------------------------------------


async def get_json(api: ApiDriver, url: str, path: str, params: Mapping[str, Any] | None = None
                   ) -> tuple[int, Any, float, int]:
    """GET `url + path`: status, JSON document, seconds and body bytes."""
    start = time.perf_counter()
    async with api.session.get(url + path, params=params, headers=api.headers) as resp:
        raw = await resp.read()
    seconds = time.perf_counter() - start
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"error": {"message": raw[:200].decode(errors="replace")}}
    return resp.status, doc, seconds, len(raw)


def error_text(status: int, doc: Any) -> str:
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        return f"{status} {error.get('code')}: {error.get('message')}"
    return f"{status}: {str(doc)[:200]}"


def session(limit: int, total_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=total_s))


def rss_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return {"rss": values.get("VmRSS", 0.0), "peak": values.get("VmHWM", 0.0)}


SWEEP_METRICS = ("zstack_jobs_swept_total", "zstack_stale_writes_total")


def metric_sums(nodes: Sequence[Any], names: Sequence[str] = SWEEP_METRICS) -> dict[str, float]:
    """Each metric summed over its label sets and over the MNs (from their /metrics)."""
    sums = dict.fromkeys(names, 0.0)
    for node in nodes:
        for line in node.text("/metrics", timeout=10).splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in sums:
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


@contextlib.asynccontextmanager
async def ticking(say: Say, message: Callable[[], str], every: float = 5.0) -> AsyncIterator[None]:
    """Say `message()` every `every` seconds while the body runs (progress of a long phase)."""
    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            say(message())

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()


# -- jobs/s, latency and CPU at 1 and n MNs -------------------------------------------------------------


async def _one_create(api: ApiDriver, name: str) -> Outcome:
    start = time.perf_counter()
    try:
        _, outcome = await api.run("POST", "/v1/vms", {"name": name, "cpu": NEW_VM_CPU, "memory": NEW_VM_MEMORY})
    except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
        outcome = Outcome("vm.create", "Error", time.perf_counter() - start, None, str(exc) or type(exc).__name__)
    return outcome


async def jobs_phase(urls: Sequence[str], token: str, count: int, concurrency: int, tag: str, say: Say) -> Phase:
    """`count` VM creates, at most `concurrency` in flight, each until its job ended."""
    gate = asyncio.Semaphore(concurrency)
    phase = Phase()
    async with session(concurrency * 2 + 8, 400) as http:
        api = ApiDriver(http, urls, token)

        async def one(i: int) -> None:
            async with gate:
                phase.outcomes.append(await _one_create(api, f"scale-{tag}-{i}"))

        start = time.perf_counter()
        async with ticking(say, lambda: f"api-scale: {len(urls)} MN(s): {len(phase.outcomes)}/{count} jobs ended"):
            await asyncio.gather(*(one(i) for i in range(count)))
        phase.seconds = time.perf_counter() - start
        return phase


def _ms_per_job(cpu_s: Mapping[str, float | None], jobs: int) -> dict[str, float | None]:
    return {part: round(v * 1e3 / jobs, 3) if v is not None and jobs else None for part, v in cpu_s.items()}


def jobs_summary(phase: Phase, cpu_s: Mapping[str, float | None], idle_s: Mapping[str, float | None],
                 mns: int, floor_ms: float) -> dict[str, Any]:
    """jobs/s, latency against the floor, CPU ms per job per part; server CPU per second when idle."""
    done = phase.succeeded
    failed = [o for o in phase.outcomes if o.state != "Succeeded"]
    latency = latency_summary([o.latency_s for o in done]) if done else None
    return {
        "mns": mns,
        "jobs": len(phase.outcomes), "succeeded": len(done), "failed": len(failed),
        "first_failure": f"{failed[0].state} {failed[0].error}" if failed else None,
        "seconds": round(phase.seconds, 3),
        "jobs_per_s": round(len(done) / phase.seconds, 2) if phase.seconds else 0.0,
        "latency": latency,
        "latency_p50_over_floor": round(latency["p50_ms"] / floor_ms, 2) if latency else None,
        "latency_p99_over_floor": round(latency["p99_ms"] / floor_ms, 2) if latency else None,
        "cpu_ms_per_job": _ms_per_job(cpu_s, len(done)),
        "idle_cpu_ms_per_s": {part: round(v * 1e3 / IDLE_WINDOW_S, 1) if v is not None else None
                              for part, v in idle_s.items()},
    }


def timed_jobs(cluster: Configuration, ctx: ScaleCluster, scale: Scale, floor_ms: float) -> dict[str, Any]:
    """Idle CPU over a short window, then the timed creates with their CPU."""
    nodes = cluster.nodes
    cpu = ServerCpu(ctx.broker_url, ctx.database_url, [n.process.pid for n in nodes if n.process])
    cpu.start()
    time.sleep(IDLE_WINDOW_S)
    idle = cpu.stop()
    tag = f"{len(nodes)}mn-{secrets.token_hex(3)}"
    ctx.say(f"api-scale: {len(nodes)} MN(s): {scale.jobs} creates, {scale.concurrency} in flight")
    cpu.start()
    phase = asyncio.run(jobs_phase([n.url for n in nodes], ctx.token, scale.jobs, scale.concurrency, tag, ctx.say))
    used = cpu.stop()
    result = jobs_summary(phase, used, idle, len(nodes), floor_ms)
    ctx.say(f"api-scale: {len(nodes)} MN(s): {result['jobs_per_s']} jobs/s, p50 "
            f"{(result['latency'] or {}).get('p50_ms')} ms, {result['failed']} failed")
    return result


# -- reads: GET by UUID and the list walk -----------------------------------------------------------------


async def get_by_uuid(api: ApiDriver, urls: Sequence[str], uuids: Sequence[str], concurrency: int, say: Say
                      ) -> dict[str, Any]:
    """GET /v1/vms/{uuid} for each of `uuids` (round-robin over the MNs): latency and errors."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def one(i: int, vm: str) -> None:
        async with gate:
            status, doc, seconds, _ = await get_json(api, urls[i % len(urls)], f"/v1/vms/{vm}")
        if status == 200 and doc.get("uuid") == vm:
            latencies.append(seconds)
        else:
            errors[error_text(status, doc)] += 1

    async with ticking(say, lambda: f"api-scale: GET by UUID: {len(latencies) + sum(errors.values())}/{len(uuids)}"):
        await asyncio.gather(*(one(i, vm) for i, vm in enumerate(uuids)))
    return {**(latency_summary(latencies) if latencies else {}), "errors": sum(errors.values()),
            "first_errors": dict(errors.most_common(3)), "concurrency": concurrency}


class ListFailed(Exception):
    """The API answered a list page with an error."""


@dataclass
class Walk:
    """One walk of GET /v1/vms page by page."""

    limit: int
    pages: list[float] = field(default_factory=list)
    rows: int = 0
    duplicates: int = 0
    oversized_pages: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"limit": self.limit, "pages": len(self.pages), "rows": self.rows, "duplicates": self.duplicates,
                "pages_over_limit": self.oversized_pages, "mib": round(self.bytes / 2**20, 2),
                "seconds": round(self.seconds, 3), "page": latency_summary(self.pages) if self.pages else None}


async def walk_pages(api: ApiDriver, url: str, limit: int, expected: int, say: Say | None = None) -> Walk:
    """Follow `continue` from the first page until it is absent; refuse a walk that never ends."""
    walk, seen, token = Walk(limit), set(), None
    max_pages = expected // limit + 10
    start = time.perf_counter()
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"continue": token} if token is not None else {})
        status, doc, seconds, size = await get_json(api, url, "/v1/vms", params)
        if status != 200:
            raise ListFailed(error_text(status, doc))
        page = doc.get("vms") or []
        walk.pages.append(seconds)
        walk.bytes += size
        walk.rows += len(page)
        walk.oversized_pages += len(page) > limit
        for vm in page:
            walk.duplicates += vm["uuid"] in seen
            seen.add(vm["uuid"])
        token = doc.get("continue")
        if say is not None and len(walk.pages) % 200 == 0:
            say(f"api-scale: limit {limit}: {len(walk.pages)} pages, {walk.rows} rows")
        if not token or len(walk.pages) >= max_pages:
            break
    walk.seconds = time.perf_counter() - start
    return walk


async def list_walks(api: ApiDriver, url: str, pid: int, expected: int, say: Say) -> dict[str, Any]:
    """Each page limit's walk with the MN's RSS around it."""
    result: dict[str, Any] = {"rows_expected": expected, "mn_memory_mib_before": rss_mib(pid), "walks": {}}
    for limit in PAGE_LIMITS:
        say(f"api-scale: walking GET /v1/vms?limit={limit} ({expected} rows)")
        walk = await walk_pages(api, url, limit, expected, say)
        result["walks"][str(limit)] = {**walk.summary(), "mn_memory_mib_after": rss_mib(pid)}
        distinct = walk.rows - walk.duplicates
        result["rows_seen"] = min(distinct, result.get("rows_seen", distinct))
    result["mn_memory_mib_after"] = rss_mib(pid)
    return result


def reads(ctx: ScaleCluster, seeded: Sequence[str], scale: Scale, rng: random.Random) -> dict[str, Any]:
    """GET by UUID over random seeded VMs, then the list walks on the first MN."""
    urls = [n.url for n in ctx.nodes]
    picks = rng.sample(list(seeded), min(scale.gets, len(seeded)))
    expected = sql_one(ctx.database_url, "SELECT count(*) FROM vm_instances")

    async def go() -> dict[str, Any]:
        async with session(64, 900) as http:
            api = ApiDriver(http, urls, ctx.token)
            ctx.say(f"api-scale: GET /v1/vms/{{uuid}} x {len(picks)}")
            by_uuid = await get_by_uuid(api, urls, picks, 8, ctx.say)
            walks = await list_walks(api, urls[0], ctx.nodes[0].process.pid, expected, ctx.say)
        return {"get_by_uuid": by_uuid, "list": walks}

    return asyncio.run(go())


# -- the storm -------------------------------------------------------------------------------------------


@dataclass
class StormCall:
    """One logical create of the storm, over its attempts."""

    index: int
    key: str
    job_id: str | None = None
    refused: str | None = None
    attempts: int = 0
    transport_errors: int = 0
    retried_busy: int = 0
    answered_s: float = 0.0  # from the storm's start to the final answer (queueing in the client included)
    request_s: float = 0.0  # the final attempt's HTTP request alone


def _retry_after(resp: aiohttp.ClientResponse) -> float:
    try:
        return min(30.0, max(0.1, float(resp.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


async def _attempt(api: ApiDriver, call: StormCall, body: dict[str, Any]) -> float | None:
    """One POST; set job_id or refused on a final answer, else return the seconds to wait first."""
    headers = {**api.headers, "Idempotency-Key": call.key}
    call.attempts += 1
    start = time.perf_counter()
    try:
        async with api.session.post(next(api.urls) + "/v1/vms", json=body, headers=headers) as resp:
            doc = await resp.json(content_type=None)
            if resp.status in (429, 503):
                call.retried_busy += 1
                return _retry_after(resp)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        call.transport_errors += 1
        return min(5.0, 0.2 * 2 ** call.attempts)
    call.request_s = time.perf_counter() - start
    job = doc.get("job") if isinstance(doc, dict) else None
    if resp.status in (200, 202) and isinstance(job, dict) and job.get("id"):
        call.job_id = job["id"]
    else:
        call.refused = error_text(resp.status, doc)
    return None


async def storm_create(api: ApiDriver, gate: asyncio.Semaphore, call: StormCall, tag: str, start: float
                       ) -> StormCall:
    """Send one create until it is accepted or refused; at most `gate` requests are open at once."""
    body = {"name": f"storm-{tag}-{call.index}", "cpu": NEW_VM_CPU, "memory": NEW_VM_MEMORY}
    while call.attempts < STORM_ATTEMPTS:
        async with gate:
            wait = await _attempt(api, call, body)
        if wait is None:
            break
        await asyncio.sleep(wait)
    else:
        call.refused = f"gave up after {call.attempts} attempts"
    call.answered_s = time.perf_counter() - start
    return call


async def storm_submit(urls: Sequence[str], token: str, scale: Scale, tag: str, say: Say) -> list[StormCall]:
    """All creates at once, at most `connections` open requests."""
    gate = asyncio.Semaphore(scale.connections)
    calls = [StormCall(i, uuid.uuid4().hex) for i in range(scale.storm)]
    async with session(scale.connections, STORM_REQUEST_TIMEOUT_S) as http:
        api = ApiDriver(http, urls, token)
        def answered() -> str:
            return f"api-scale: storm: {sum(1 for c in calls if c.job_id or c.refused)}/{len(calls)} creates answered"

        async with ticking(say, answered):
            start = time.perf_counter()
            await asyncio.gather(*(storm_create(api, gate, c, tag, start) for c in calls))
    return calls


def job_states(database_url: str, ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """state and error code of each job in `ids` that has a row."""
    with closing(psycopg2.connect(dsn(database_url))) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, state, error->>'code' FROM jobs WHERE id = ANY(%s)", (list(ids),))
        return {row[0]: (row[1], row[2]) for row in cur.fetchall()}


def await_jobs(database_url: str, ids: Sequence[str], say: Say) -> tuple[dict[str, tuple[str, str | None]], float]:
    """Poll the jobs table until every job ended, none ended for JOB_STALL_S, or JOB_WAIT_S passed."""
    start = last_change = time.monotonic()
    ended, states = 0, {}
    while True:
        states = job_states(database_url, ids)
        now_ended = sum(1 for s, _ in states.values() if s in ("Succeeded", "Failed"))
        if now_ended != ended:
            ended, last_change = now_ended, time.monotonic()
            say(f"api-scale: storm: {ended}/{len(ids)} accepted jobs ended")
        now = time.monotonic()
        if ended == len(ids) or now - last_change > JOB_STALL_S or now - start > JOB_WAIT_S:
            return states, now - start
        time.sleep(1.0)


def storm_outcome(database_url: str, calls: Sequence[StormCall], tag: str) -> dict[str, Any]:
    """Counts over the storm's calls and, in SQL, its jobs and VMs."""
    ids = [c.job_id for c in calls if c.job_id]
    states = job_states(database_url, ids)
    failed = Counter(code or "unknown" for s, code in states.values() if s == "Failed")
    doubled = sql_one(database_url, "SELECT count(*) FROM (SELECT name FROM vm_instances WHERE name LIKE %s"
                                    " GROUP BY name HAVING count(*) > 1) d", (f"storm-{tag}-%",))
    refused = Counter(c.refused for c in calls if c.refused)
    return {
        "creates": len(calls), "accepted": len(ids), "distinct_jobs": len(set(ids)),
        "refused": sum(refused.values()), "refused_by_reason": dict(refused.most_common(10)),
        "succeeded": sum(1 for s, _ in states.values() if s == "Succeeded"),
        "failed": sum(failed.values()), "failed_by_code": dict(failed),
        "lost": sum(1 for i in ids if states.get(i, ("", None))[0] not in ("Succeeded", "Failed")),
        "doubled": doubled,
        "storm_vms": sql_one(database_url, "SELECT count(*) FROM vm_instances WHERE name LIKE %s"
                                           " AND state <> 'Destroyed'", (f"storm-{tag}-%",)),
        "attempts": sum(c.attempts for c in calls),
        "transport_errors": sum(c.transport_errors for c in calls),
        "retried_503_429": sum(c.retried_busy for c in calls),
        **capacity_report(database_url),
    }


def storm(ctx: ScaleCluster, scale: Scale) -> dict[str, Any]:
    """The storm: submit all, await every accepted job in SQL, then count."""
    tag = secrets.token_hex(4)
    ctx.say(f"api-scale: storm of {scale.storm} creates, {scale.connections} requests open at most")
    metrics_before = metric_sums(ctx.nodes)
    start = time.perf_counter()
    calls = asyncio.run(storm_submit([n.url for n in ctx.nodes], ctx.token, scale, tag, ctx.say))
    submit_s = time.perf_counter() - start
    _, wait_s = await_jobs(ctx.database_url, [c.job_id for c in calls if c.job_id], ctx.say)
    total_s = time.perf_counter() - start
    result = storm_outcome(ctx.database_url, calls, tag)
    swept = {k: int(v - metrics_before[k]) for k, v in metric_sums(ctx.nodes).items()}
    accepted = [c for c in calls if c.job_id]
    return {**result, "connections": scale.connections, "vm_cpu": NEW_VM_CPU, "vm_memory_mib": NEW_VM_MEMORY,
            "capacity_failures_expected": False, "submit_seconds": round(submit_s, 2),
            "accept_request_latency": latency_summary([c.request_s for c in accepted]) if accepted else None,
            "accepted_after": latency_summary([c.answered_s for c in accepted]) if accepted else None,
            "wait_seconds": round(wait_s, 2), "seconds": round(total_s, 2),
            "succeeded_per_s": round(result["succeeded"] / total_s, 1) if total_s else 0.0,
            "jobs_swept": swept["zstack_jobs_swept_total"], "stale_writes": swept["zstack_stale_writes_total"]}


# -- the run ---------------------------------------------------------------------------------------------


def start_cluster(count: int, ctx: ScaleCluster, tag: str) -> Configuration:
    """`count` fresh MN processes (started and stopped by `with`)."""
    ctx.say(f"api-scale: starting {count} MN(s)")
    return Configuration(count, ctx.broker_url, ctx.database_url, ctx.log_dir, ctx.token, tag)


def setup(ctx: ScaleCluster, scale: Scale, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """One MN creates the schema and stops; the hosts and VMs are seeded with COPY (untimed for the API)."""
    with start_cluster(1, ctx, "schema"):
        pass
    ctx.say(f"api-scale: seeding {scale.hosts} hosts and {scale.vms} Running VMs with COPY")
    start = time.perf_counter()
    seeded = seed_rows(ctx.database_url, scale, rng)
    return seeded, {"method": "COPY into hosts and vm_instances after one MN created the schema",
                    "seconds": round(time.perf_counter() - start, 2), **capacity_report(ctx.database_url)}


def run_sections(ctx: ScaleCluster, sections: Mapping[str, Section], checks: dict[str, bool]) -> dict[str, Any]:
    """Each extra section on the running cluster; its "checks" join the run's as `<name>.<check>`."""
    results: dict[str, Any] = {}
    for name, section in sections.items():
        ctx.say(f"api-scale: section {name}")
        results[name] = section(ctx)
        for check, ok in (results[name].get("checks") or {}).items():
            checks[f"{name}.{check}"] = bool(ok)
    return results


def judge(result: dict[str, Any], scale: Scale) -> dict[str, bool]:
    jobs, listing, storm_ = result["jobs"], result["reads"]["list"], result["storm"]
    return {
        "jobs_all_succeeded": all(jobs[k]["failed"] == 0 for k in ("mns_1", f"mns_{scale.mns}")),
        "get_by_uuid_no_errors": result["reads"]["get_by_uuid"]["errors"] == 0,
        "list_rows_complete": listing["rows_seen"] == listing["rows_expected"]
        and all(w["duplicates"] == 0 and w["pages_over_limit"] == 0 for w in listing["walks"].values()),
        "storm_lost_zero": storm_["lost"] == 0,
        "storm_doubled_zero": storm_["doubled"] == 0,
        "hosts_over_capacity_zero": storm_["hosts_over_capacity"] == 0,
        "hosts_used_matches_vms": storm_["hosts_used_unlike_their_vms"] == 0,
    }


def measured(ctx: ScaleCluster, scale: Scale, rng: random.Random, seeded: Sequence[str],
             sections: Mapping[str, Section]) -> dict[str, Any]:
    """The timed phases: jobs at 1 MN, then at `mns` MNs the floor, jobs, reads, storm and sections."""
    ctx.say("api-scale: measuring the floor (raw pika round trip, raw psycopg2 commit)")
    floor = measure_floor(ctx.broker_url, ctx.database_url)
    with start_cluster(1, ctx, "one") as one:
        jobs_1 = timed_jobs(one, ctx, scale, floor["floor_ms"])
    result: dict[str, Any] = {"floor": floor}
    with start_cluster(scale.mns, ctx, "many") as many:
        cluster = replace(ctx, nodes=many.nodes)
        jobs_n = timed_jobs(many, cluster, scale, floor["floor_ms"])
        result["jobs"] = {"mns_1": jobs_1, f"mns_{scale.mns}": jobs_n,
                          f"jobs_per_s_{scale.mns}_over_1": round(jobs_n["jobs_per_s"] / jobs_1["jobs_per_s"], 3)
                          if jobs_1["jobs_per_s"] else None}
        result["reads"] = reads(cluster, seeded, scale, rng)
        result["storm"] = storm(cluster, scale)
        checks = judge(result, scale)
        result.update(run_sections(cluster, sections, checks))
    result["checks"] = checks
    return result


def run(broker_url: str, database_url: str, scale: Scale, *, log_dir: Path | None = None,
        progress: Say | None = None, sections: Mapping[str, Section] | None = None) -> dict[str, Any]:
    """The benchmark's JSON object. `sections` name extra measurements run last on the `mns`-MN cluster."""
    scale.check()
    started = time.perf_counter()
    rng = random.Random(scale.seed)
    scratch = log_dir or Path(tempfile.mkdtemp(prefix="zstack-bench-api-scale-"))
    ctx = ScaleCluster(broker_url, database_url, [], secrets.token_urlsafe(24), scratch,
                       progress or (lambda _m: None), scale.seed)
    seeded, seeding = setup(ctx, scale, rng)
    result = measured(ctx, scale, rng, seeded, sections or {})
    if log_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    checks = result.pop("checks")
    return {
        "benchmark": "api-scale",
        "params": {**vars(scale), "host_cpu": HOST_CPU, "host_memory_mib": HOST_MEMORY,
                   "seeded_vm_cpu": SEED_VM_CPU, "seeded_vm_memory_mib": SEED_VM_MEMORY,
                   "host_ping_interval_s": CloudSettings.from_env().host_ping_interval, "cpu_count": os.cpu_count(),
                   "cpu_sources": {"rabbitmq_pid_found": listening_pid(broker_url) is not None,
                                   "postgresql_pid_found": listening_pid(database_url) is not None}},
        "setup": seeding,
        **result,
        "seconds": round(time.perf_counter() - started, 1),
        "checks": checks,
        "targets_met": all(checks.values()),
    }
