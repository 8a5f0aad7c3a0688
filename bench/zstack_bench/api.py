"""`zstack-bench api`: VM operations per second through HTTP -> api.portal -> the owner MN -> PostgreSQL.

Two configurations in the same run, on the same broker and database: 1 MN, then 3 MNs, alternating
over `rounds` so that drift on a shared machine hits both alike. Each one
starts its MNs with an API token, adds `hosts` hosts with plenty of capacity and creates `vms` VMs
(timed apart), then times `cycles` stop/start cycles per VM with at most `concurrency` jobs in flight,
the requests spread round-robin over the MNs' HTTP ports. An operation counts once its job is
terminal (long poll on GET /v1/jobs/{id}?wait=). The VMs are destroyed and the hosts deleted
afterwards (untimed), so the next configuration starts from the same state.

CPU seconds per 1000 operations are utime+stime from /proc over the timed phase, summed over every
MN process, RabbitMQ's and PostgreSQL's process trees (found by the ports in their URLs, with reaped
children) - the servers; the benchmark client is reported apart.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from zstack_bench.stats import latency_summary, percentile, summary
from zstack_devcluster.localnodes import LocalNode, agreed_members, wait_until

Say = Callable[[str], None]
TERMINAL = frozenset({"Succeeded", "Failed"})
HOST_CPU, HOST_MEMORY = 4096, 16_777_216  # the API's maxima: room for any VM count we run
VM_CPU, VM_MEMORY = 1, 64
POLL_WAIT_S = 30  # server-side wait of each long poll
JOB_DEADLINE_S = 300.0  # an operation not terminal by then counts as failed ("timeout")


# -- CPU accounting from /proc -------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _cpu_with_reaped_children(pid: int) -> float:
    """utime + stime + cutime + cstime of `pid` in seconds (0 when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [root], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by a process tree: a live process's reaped children are in its cutime/cstime."""
    return sum(_cpu_with_reaped_children(pid) for pid in process_tree(root))


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(cols[9])
    return inodes


def listening_pid(url: str) -> int | None:
    """The pid of the local process listening on the port of `url` (None if not local or not found)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return None
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(parts.port)}
    owners = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            if any(os.readlink(fd.path) in sockets for fd in fds):
                owners.append(int(entry.name))
        except OSError:
            continue
    return min(owners) if owners else None  # forked workers share the socket: the parent has the lowest pid


class ServerCpu:
    """CPU seconds of the MNs, RabbitMQ and PostgreSQL (the servers) and of this process over a window."""

    def __init__(self, broker_url: str, database_url: str, mn_pids: Sequence[int]) -> None:
        self.roots: dict[str, list[int]] = {"mns": list(mn_pids)}
        for name, url in (("rabbitmq", broker_url), ("postgresql", database_url)):
            pid = listening_pid(url)
            self.roots[name] = [pid] if pid is not None else []
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: sum(tree_cpu_seconds(pid) for pid in pids) for name, pids in self.roots.items()}
        now["client"] = time.process_time()
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> dict[str, float | None]:
        """Seconds used since start(): per part (None when its process was not found), and the servers' total."""
        after = self._now()
        used: dict[str, float | None] = {
            name: round(after[name] - self._before[name], 3) if name == "client" or self.roots[name] else None
            for name in after}
        used["total"] = round(sum(v for k, v in used.items() if k != "client" and v is not None), 3)
        return used


class BenchError(RuntimeError):
    """The benchmark could not do its work (an API error, a failed setup job, an MN that did not start)."""


@dataclass
class Outcome:
    """One operation: its job's final state, client latency (submit to terminal seen) and server duration."""

    operation: str
    state: str
    latency_s: float
    server_s: float | None
    error: str | None = None


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


class ApiDriver:
    """Submits jobs round-robin over the MNs' API URLs and waits for each to be terminal."""

    def __init__(self, session: aiohttp.ClientSession, urls: Sequence[str], token: str) -> None:
        self.session = session
        self.urls = itertools.cycle(urls)
        self.headers = {"Authorization": f"Bearer {token}"}

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None,
                    params: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        url = next(self.urls) + path
        async with self.session.request(method, url, json=body, params=params, headers=self.headers) as resp:
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                doc = {"error": {"message": (await resp.text())[:200]}}
            return resp.status, doc if isinstance(doc, dict) else {}

    async def submit(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, doc = await self._json(method, path, body)
        if status != 202 or "job" not in doc:
            error = doc.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            raise BenchError(f"{method} {path} answered {status}: {message or doc}")
        return doc["job"]

    async def wait(self, job: dict[str, Any], deadline: float) -> dict[str, Any]:
        while job.get("state") not in TERMINAL and time.monotonic() < deadline:
            wait = max(1, min(POLL_WAIT_S, int(deadline - time.monotonic())))
            status, doc = await self._json("GET", f"/v1/jobs/{job['id']}", params={"wait": wait})
            if status != 200:
                raise BenchError(f"GET /v1/jobs/{job['id']} answered {status}: {doc.get('error')}")
            job = doc
        return job

    async def run(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[dict[str, Any], Outcome]:
        """Submit and wait; the outcome's state is the job's, or "Timeout"."""
        start = time.perf_counter()
        job = await self.submit(method, path, body)
        job = await self.wait(job, time.monotonic() + JOB_DEADLINE_S)
        latency = time.perf_counter() - start
        state = job.get("state") if job.get("state") in TERMINAL else "Timeout"
        error = job.get("error") or None
        message = f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else None
        return job, Outcome(job.get("operation", path), state, latency,
                            _seconds_between(job.get("created_at"), job.get("finished_at")), message)

    async def get(self, path: str) -> dict[str, Any]:
        status, doc = await self._json("GET", path)
        if status != 200:
            raise BenchError(f"GET {path} answered {status}: {doc.get('error')}")
        return doc


async def _gather_limited(jobs: Sequence[Callable[[], Any]], concurrency: int) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Any]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


def _require_success(outcomes: Sequence[Outcome], what: str) -> None:
    bad = [o for o in outcomes if o.state != "Succeeded"]
    if bad:
        raise BenchError(f"{len(bad)} of {len(outcomes)} {what} jobs did not succeed; first: "
                         f"{bad[0].operation} {bad[0].state} {bad[0].error}")


@dataclass
class Workload:
    hosts: int
    vms: int
    cycles: int
    concurrency: int


@dataclass
class Phase:
    """A timed phase's outcomes and wall time."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def succeeded(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "Succeeded"]


async def _setup(api: ApiDriver, tag: str, work: Workload, say: Say) -> tuple[list[str], list[str], Phase]:
    """Add the hosts, then create the VMs (timed); return host UUIDs, VM UUIDs and the create phase."""
    results = await _gather_limited(
        [lambda i=i: api.run("POST", "/v1/hosts", {"name": f"bench-{tag}-host{i}", "cpu": HOST_CPU,
                                                    "memory": HOST_MEMORY}) for i in range(work.hosts)],
        work.concurrency)
    _require_success([o for _, o in results], "host.add")
    hosts = [job["resource_uuid"] for job, _ in results]
    say(f"api {tag}: {len(hosts)} hosts added; creating {work.vms} VMs")
    start = time.perf_counter()
    results = await _gather_limited(
        [lambda i=i: api.run("POST", "/v1/vms", {"name": f"bench-{tag}-vm{i}", "cpu": VM_CPU, "memory": VM_MEMORY})
         for i in range(work.vms)], work.concurrency)
    create = Phase([o for _, o in results], time.perf_counter() - start)
    _require_success(create.outcomes, "vm.create")
    return hosts, [job["resource_uuid"] for job, _ in results], create


async def _cycles(api: ApiDriver, vms: Sequence[str], work: Workload) -> Phase:
    """Every VM runs stop, start `cycles` times in order; at most `concurrency` jobs in flight overall.

    A refused request (non-202) or a broken connection counts as a failed operation, not a crash.
    """
    gate = asyncio.Semaphore(work.concurrency)
    phase = Phase()

    async def lane(vm: str) -> None:
        for _ in range(work.cycles):
            for action in ("stop", "start"):
                async with gate:
                    start = time.perf_counter()
                    try:
                        _, outcome = await api.run("POST", f"/v1/vms/{vm}/actions/{action}")
                    except (BenchError, aiohttp.ClientError, TimeoutError) as exc:
                        outcome = Outcome(f"vm.{action}", "Error", time.perf_counter() - start, None,
                                          str(exc) or type(exc).__name__)
                phase.outcomes.append(outcome)
                if outcome.state != "Succeeded":
                    return  # the VM's state is unknown now: further actions would only fail

    start = time.perf_counter()
    await asyncio.gather(*(lane(vm) for vm in vms))
    phase.seconds = time.perf_counter() - start
    return phase


async def _cleanup(api: ApiDriver, hosts: Sequence[str], vms: Sequence[str], concurrency: int, say: Say) -> None:
    """Destroy the VMs and delete the hosts (untimed); a failure is reported, never fatal."""
    try:
        results = await _gather_limited(
            [lambda v=v: api.run("POST", f"/v1/vms/{v}/actions/destroy") for v in vms], concurrency)
        _require_success([o for _, o in results], "vm.destroy")
        results = await _gather_limited([lambda h=h: api.run("DELETE", f"/v1/hosts/{h}") for h in hosts],
                                        concurrency)
        _require_success([o for _, o in results], "host.delete")
    except (BenchError, aiohttp.ClientError, TimeoutError) as exc:
        say(f"warning: cleanup incomplete, the next configuration shares leftovers: {exc}")


@dataclass
class RoundResult:
    """What one configuration measured in one round."""

    mns: int
    create: Phase
    cycles: Phase
    cpu_s: dict[str, float | None]
    not_running_after: int

    @property
    def ops_per_s(self) -> float:
        return len(self.cycles.succeeded) / self.cycles.seconds if self.cycles.seconds else 0.0


async def _drive(urls: Sequence[str], token: str, tag: str, work: Workload, cpu: ServerCpu,
                 say: Say) -> RoundResult:
    connector = aiohttp.TCPConnector(limit=work.concurrency * 2 + 8)
    timeout = aiohttp.ClientTimeout(total=POLL_WAIT_S + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        api = ApiDriver(session, urls, token)
        hosts, vms, create = await _setup(api, tag, work, say)
        say(f"api {tag}: {len(vms)} VMs Running; timing {work.cycles} stop/start cycle(s) each, "
            f"{work.concurrency} in flight")
        cpu.start()
        cycles = await _cycles(api, vms, work)
        cpu_used = cpu.stop()
        mine = set(vms)
        final = {vm["uuid"]: vm["state"] for vm in (await api.get("/v1/vms"))["vms"] if vm["uuid"] in mine}
        await _cleanup(api, hosts, vms, work.concurrency, say)
    result = RoundResult(len(urls), create, cycles, cpu_used, sum(1 for vm in vms if final.get(vm) != "Running"))
    say(f"api {tag}: {len(cycles.succeeded)} ops in {cycles.seconds:.2f}s = {result.ops_per_s:.1f} ops/s")
    return result


def _per_1000(cpu_s: float | None, ops: int) -> float | None:
    return round(cpu_s * 1000 / ops, 3) if cpu_s is not None and ops else None


def summarise(rounds: Sequence[RoundResult]) -> dict[str, Any]:
    """One configuration over its rounds: rates per round (worst = lowest), latencies and CPU pooled."""
    done = [o for r in rounds for o in r.cycles.succeeded]
    failed = [o for r in rounds for o in r.cycles.outcomes if o.state != "Succeeded"]
    created = [o for r in rounds for o in r.create.succeeded]
    server_s = [o.server_s for o in done if o.server_s is not None]
    cpu_s = {part: (None if any(r.cpu_s[part] is None for r in rounds)
                    else round(sum(r.cpu_s[part] for r in rounds), 3))  # type: ignore[misc]
             for part in rounds[0].cpu_s}
    return {
        "mns": rounds[0].mns,
        "ops": len(done),
        "failed": len(failed),
        "first_failure": f"{failed[0].operation} {failed[0].state} {failed[0].error}" if failed else None,
        "seconds": round(sum(r.cycles.seconds for r in rounds), 3),
        "ops_per_s": summary([r.ops_per_s for r in rounds], worst="min", digits=2),
        "latency": latency_summary([o.latency_s for o in done]) if done else None,
        "server_job_ms_p50": round(percentile(server_s, 50) * 1e3, 2) if server_s else None,
        "create_per_s": summary([len(r.create.succeeded) / r.create.seconds for r in rounds], worst="min", digits=2),
        "create_latency": latency_summary([o.latency_s for o in created]),
        "cpu_s": cpu_s,
        "cpu_s_per_1000_ops": {part: _per_1000(value, len(done)) for part, value in cpu_s.items()},
        "vms_not_running_after": sum(r.not_running_after for r in rounds),
    }


class Configuration:
    """`count` MN processes sharing the run's broker and database, all stopped at the end."""

    def __init__(self, count: int, broker_url: str, database_url: str, log_dir: Path, token: str, tag: str) -> None:
        self.nodes = [LocalNode(f"api-{tag}-mn{i}", broker_url, database_url, log_dir,
                                env={"ZSTACK_API_TOKEN": token}) for i in range(count)]

    def __enter__(self) -> Configuration:
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_ready(90)
            expected = frozenset(node.uuid for node in self.nodes)
            wait_until(lambda: agreed_members(self.nodes) == expected, 60,
                       f"{len(self.nodes)} MNs to agree on one ring")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        for node in self.nodes:
            node.stop(timeout=15)

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- log of {n.name} ({n.log_path}):\n{n.tail(lines)}" for n in self.nodes)


def run_configuration(count: int, broker_url: str, database_url: str, log_dir: Path, work: Workload, tag: str,
                      say: Say) -> RoundResult:
    token = secrets.token_urlsafe(24)
    config = Configuration(count, broker_url, database_url, log_dir, token, tag)
    with config:
        say(f"api {tag}: {count} MN(s) ready and agreed; adding {work.hosts} hosts")
        cpu = ServerCpu(broker_url, database_url, [n.process.pid for n in config.nodes if n.process])
        try:
            return asyncio.run(_drive([n.url for n in config.nodes], token, tag, work, cpu, say))
        except Exception:
            say(config.logs())
            raise


CONFIGURATIONS = (1, 3)


def run(broker_url: str, database_url: str, *, hosts: int, vms: int, cycles: int, concurrency: int,
        rounds: int = 1, log_dir: Path | None = None, progress: Say | None = None) -> dict[str, Any]:
    """The benchmark's JSON object. Rounds alternate 1 MN, 3 MNs, so drift on a shared machine hits both."""
    say = progress or (lambda _m: None)
    work = Workload(hosts, vms, cycles, concurrency)
    scratch = log_dir or Path(tempfile.mkdtemp(prefix="zstack-bench-api-"))
    per_round: dict[int, list[RoundResult]] = {n: [] for n in CONFIGURATIONS}
    for rnd in range(1, rounds + 1):
        for count in CONFIGURATIONS:
            tag = f"r{rnd}-{count}mn"
            per_round[count].append(run_configuration(count, broker_url, database_url, scratch, work, tag, say))
    if log_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {f"mns_{n}": summarise(per_round[n]) for n in CONFIGURATIONS}
    one, three = results["mns_1"], results["mns_3"]
    ratios = [b.ops_per_s / a.ops_per_s for a, b in zip(per_round[1], per_round[3], strict=True) if a.ops_per_s]
    expected_ops = vms * cycles * 2 * rounds
    checks = {
        "no_failed_jobs": one["failed"] == 0 and three["failed"] == 0,
        "every_op_completed": one["ops"] == expected_ops and three["ops"] == expected_ops,
        "vms_running_after_cycles": one["vms_not_running_after"] == 0 and three["vms_not_running_after"] == 0,
    }
    return {
        "benchmark": "api",
        "params": {"hosts": hosts, "vms": vms, "cycles": cycles, "concurrency": concurrency, "rounds": rounds,
                   "ops_per_configuration": expected_ops, "vm_cpu": VM_CPU, "vm_memory_mib": VM_MEMORY,
                   "cpu_count": os.cpu_count(),
                   "cpu_sources": {"rabbitmq_pid_found": listening_pid(broker_url) is not None,
                                   "postgresql_pid_found": listening_pid(database_url) is not None}},
        **results,
        "ops_per_s_3_over_1": summary(ratios, worst="min", digits=3) if ratios else None,
        "checks": checks,
        "targets_met": all(checks.values()),
    }
