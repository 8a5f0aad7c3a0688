"""`zstack-bench faults`: membership under real faults of the broker and the database.

Three `zstack-node` processes with the cloud services run on a private RabbitMQ and PostgreSQL, each
reaching them through a TCP proxy of its own, so one MN can be cut off alone (a black hole: bytes stop,
nothing is refused). Two kinds of scenario (docs/ARCHITECTURE.md, "Membership states"):

- a shared outage: the broker or the database stopped for N seconds under API load. Expected: no UUID
  changes, no keys moved, the ring 3/3 and every MN ready soon after the dependency is back, and every
  job the API accepted finished.
- a lone MN cut off (from the database, from the broker, or frozen by SIGSTOP). Expected: the others
  evict it within the heartbeat timeout, its hosts answer from their new owner, it answered nothing as
  owner under its old UUID after the eviction, and it rejoins under a new UUID once it is back.

The tests (tests/cloud/test_outages.py) run the same scenarios and assert on these figures.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from zstack_devcluster.localnodes import LocalNode, agreed_members, wait_until
from zstack_devcluster.services import PostgreSQL, RabbitMQ
from zstack_devcluster.services.base import Service
from zstack_devcluster.tcpproxy import TcpProxy
from zstack_node.config import default
from zstack_node.ring import Ring

Say = Callable[[str], None]
TIMEOUT: float = default("heartbeat_timeout")
INTERVAL: float = default("heartbeat_interval")
TERMINAL = ("Succeeded", "Failed")


def _keys(count: int = 10_000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [uuidlib.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(count)]


KEYS = _keys()


def via(url: str, proxy: TcpProxy) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    host, port = proxy.address
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"))


def keys_moved(before: frozenset[str], after: frozenset[str]) -> float:
    """The share of resource keys whose owner differs between the two rings."""
    if before == after:
        return 0.0
    old, new = Ring.of(before), Ring.of(after)
    return sum(old.owner(k) != new.owner(k) for k in KEYS) / len(KEYS)


class Api:
    """A tiny client of one MN's REST API (urllib: the bench needs no HTTP library)."""

    def __init__(self, node: LocalNode, token: str) -> None:
        self.node, self.token = node, token

    def call(self, method: str, path: str, body: Any = None, timeout: float = 15.0) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.node.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Answer(response.status, json.loads(response.read() or b"null"), dict(response.headers))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, json.loads(exc.read() or b"null"), dict(exc.headers))


class Answer(NamedTuple):
    status: int
    body: Any
    headers: dict[str, str]


@dataclasses.dataclass
class FaultCluster:
    """MNs with the cloud services, each through its own proxies to the broker and the database."""

    broker_url: str
    database_url: str
    workdir: Path
    token: str = dataclasses.field(default_factory=lambda: "bench-" + uuidlib.uuid4().hex)
    nodes: list[LocalNode] = dataclasses.field(default_factory=list)
    db_proxies: list[TcpProxy] = dataclasses.field(default_factory=list)
    broker_proxies: list[TcpProxy] = dataclasses.field(default_factory=list)
    hosts: list[str] = dataclasses.field(default_factory=list)

    def start(self, count: int = 3, hosts: int = 12) -> FaultCluster:
        for n in range(count):
            db = TcpProxy(_address(self.database_url))
            broker = TcpProxy(_address(self.broker_url))
            self.db_proxies.append(db)
            self.broker_proxies.append(broker)
            self.nodes.append(LocalNode(
                f"mn{n}", via(self.broker_url, broker), via(self.database_url, db), self.workdir,
                env={"ZSTACK_API_TOKEN": self.token, "ZSTACK_SIM_LATENCY": "0.002"}).start())
        for node in self.nodes:
            node.wait_ready(90)
        self.wait_agreed(frozenset(self.uuids()))
        api = self.api()
        for n in range(hosts):
            status, body, _ = api.call("POST", "/v1/hosts", {"name": f"host-{n}", "cpu": 4096, "memory": 16777216})
            if status != 202:
                raise RuntimeError(f"adding a host failed: {status} {body}")
            self.hosts.append(body["job"]["resource_uuid"])
        wait_until(lambda: all(api.call("GET", f"/v1/hosts/{h}").status == 200 for h in self.hosts), 60,
                   "every host to be added")
        return self

    def api(self, node: LocalNode | None = None) -> Api:
        return Api(node or random.choice(self.nodes), self.token)

    def uuids(self) -> list[str]:
        return [node.uuid for node in self.nodes]

    def members(self) -> frozenset[str]:
        return frozenset(self.nodes[0].ring()["members"])

    def wait_agreed(self, expected: frozenset[str] | None = None, timeout: float = 60.0,
                    nodes: Sequence[LocalNode] | None = None) -> frozenset[str]:
        """Wait until every node is ready and they report the same members (`expected`, if given)."""
        nodes = list(nodes or self.nodes)

        def agreed() -> frozenset[str] | None:
            members = agreed_members(nodes)
            if not members or (expected is not None and members != expected):
                return None
            return members if all(n.ready() for n in nodes) else None

        return wait_until(agreed, timeout, f"{len(nodes)} ready MNs to agree on {sorted(expected or [])}")

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {n.name}\n{n.tail(lines)}" for n in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        for proxy in [*self.db_proxies, *self.broker_proxies]:
            proxy.close()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 0


class Load(threading.Thread):
    """Creates VMs through random MNs until stopped; keeps the id of every job the API accepted."""

    def __init__(self, cluster: FaultCluster, seed: int) -> None:
        super().__init__(daemon=True, name="api-load")
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.accepted: list[str] = []
        self.statuses: dict[int, int] = {}  # of the creates
        self.reads: dict[int, int] = {}  # of GET /v1/hosts/{uuid}
        self.retry_after_missing = 0  # 503 answers without a Retry-After hint
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            api = Api(self.rng.choice(self.cluster.nodes), self.cluster.token)
            body = {"name": f"vm-{self.rng.getrandbits(32):08x}", "cpu": 1, "memory": 64}
            status, answer, headers = self._call(api, "POST", "/v1/vms", body)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 202:
                self.accepted.append(answer["job"]["id"])
            elif status == 503 and "Retry-After" not in headers:
                self.retry_after_missing += 1
            read = self._call(api, "GET", f"/v1/hosts/{self.rng.choice(self.cluster.hosts)}").status
            self.reads[read] = self.reads.get(read, 0) + 1
            if status in (0, 503):
                self._stop_event.wait(0.1)

    @staticmethod
    def _call(api: Api, method: str, path: str, body: Any = None) -> Answer:
        try:
            return api.call(method, path, body, timeout=10)
        except OSError:
            return Answer(0, None, {})

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)

    def unfinished(self, timeout: float = 120.0) -> tuple[list[str], int]:
        """Wait for every accepted job to end; the ones that did not (lost), and how many failed."""
        api = self.cluster.api(self.cluster.nodes[0])
        states: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for job in [j for j in self.accepted if states.get(j) not in TERMINAL]:
                status, body, _ = api.call("GET", f"/v1/jobs/{job}")
                if status == 200:
                    states[job] = body["state"]
            if all(states.get(j) in TERMINAL for j in self.accepted):
                break
            time.sleep(0.5)
        lost = [j for j in self.accepted if states.get(j) not in TERMINAL]
        return lost, sum(states.get(j) == "Failed" for j in self.accepted)


@contextmanager
def _load(cluster: FaultCluster, seed: int) -> Iterator[Load]:
    load = Load(cluster, seed)
    load.start()
    try:
        wait_until(lambda: len(load.accepted) >= 5, 30, "the API load to get 5 jobs accepted")
        yield load
    finally:
        load.stop()


def shared_outage(cluster: FaultCluster, server: Service, seconds: float, seed: int, say: Say) -> dict[str, Any]:
    """Stop `server` (shared by every MN) for `seconds` under API load, then start it again."""
    uuids = cluster.uuids()
    ring = cluster.members()
    with _load(cluster, seed) as load:
        say(f"{server.kind} down for {seconds:g}s under API load ({len(load.accepted)} jobs accepted so far)")
        down_at = time.monotonic()
        server.stop()
        suspended = _first_time(lambda: all(not n.ready() for n in cluster.nodes), seconds)
        time.sleep(max(0.0, down_at + seconds - time.monotonic()))  # the length of the fault, not a wait
        server.start()
        back_at = time.monotonic()
        say(f"{server.kind} back after {back_at - down_at:.1f}s; waiting for the ring")
        cluster.wait_agreed(timeout=60)
        agreement = time.monotonic() - back_at
        accepted_during = len(load.accepted)
    lost, failed = load.unfinished()
    after = cluster.uuids()
    return {
        "fault": f"{server.kind.lower()} down", "down_s": round(back_at - down_at, 2),
        "uuid_changes": sum(a != b for a, b in zip(uuids, after, strict=True)),
        "keys_moved": keys_moved(ring, cluster.members()),
        "all_suspended_after_s": None if suspended is None else round(suspended, 2),
        "ring_agreement_after_return_s": round(agreement, 2),
        "jobs_accepted": accepted_during, "jobs_lost": len(lost), "jobs_failed": failed,
        "api_statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        "read_statuses": {str(k): v for k, v in sorted(load.reads.items())},
        "unavailable_without_retry_after": load.retry_after_missing,
    }


def _first_time(condition: Callable[[], bool], within: float) -> float | None:
    """Seconds until `condition` first held, polled every 50 ms; None if not within `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            if condition():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    return None


class Pinger(threading.Thread):
    """Pings the victim's hosts through the other MNs; records which MN answered as their owner, and when."""

    def __init__(self, cluster: FaultCluster, others: Sequence[LocalNode], hosts: Sequence[str]) -> None:
        super().__init__(daemon=True, name="pinger")
        self.apis = [Api(n, cluster.token) for n in others]
        self.hosts = list(hosts)
        self.answers: list[tuple[float, str]] = []  # (monotonic time received, tracked_by)
        self._stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_event.is_set():
            api, host = self.apis[n % len(self.apis)], self.hosts[n % len(self.hosts)]
            n += 1
            try:
                status, body, _ = api.call("POST", f"/v1/hosts/{host}/actions/ping", {}, timeout=15)
            except OSError:
                continue
            if status == 200:
                self.answers.append((time.monotonic(), body["tracked_by"]))
            else:
                self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


LONE_FAULTS = ("database", "broker", "sigstop")


def lone_cut(cluster: FaultCluster, fault: str, say: Say) -> dict[str, Any]:
    """Cut one MN off alone (`fault` in LONE_FAULTS) until the others evicted it, then let it back. The victim
    is the MN that owns the most hosts, so that its pings show who answers as their owner."""
    ring = Ring.of(cluster.members())
    owned = {n: [h for h in cluster.hosts if ring.owner(h) == node.uuid] for n, node in enumerate(cluster.nodes)}
    index = max(owned, key=lambda n: len(owned[n]))
    victim, mine = cluster.nodes[index], owned[index]
    others = [node for node in cluster.nodes if node is not victim]
    old = victim.uuid
    pinger = Pinger(cluster, others, mine)
    pinger.start()
    wait_until(lambda: any(by == old for _, by in pinger.answers), 30, "the victim to answer a ping as owner")
    cut, heal = _fault(cluster, index, fault)
    say(f"cutting {victim.name} ({old[:8]}) off: {fault}")
    cut_at = time.monotonic()
    cut()
    suspended = None
    try:
        evicted_at = None
        while evicted_at is None:
            if time.monotonic() - cut_at > 60:
                raise TimeoutError(f"the others did not evict the cut-off MN within 60s\n{cluster.logs()}")
            if suspended is None and fault != "sigstop" and _state(victim) == "suspended":
                suspended = time.monotonic() - cut_at
            if all(old not in n.ring()["members"] for n in others):
                evicted_at = time.monotonic()
            time.sleep(0.02)
        wait_until(lambda: any(t > evicted_at and by != old for t, by in pinger.answers), 30,
                   "its hosts to answer from their new owner")
    finally:
        heal()
    healed_at = time.monotonic()
    say(f"{victim.name} evicted after {evicted_at - cut_at:.2f}s; back, waiting for it to rejoin")
    members = cluster.wait_agreed(timeout=60)
    rejoin = time.monotonic() - healed_at
    pinger.stop()
    by_old = [t for t, by in pinger.answers if by == old]
    return {
        "fault": f"one MN cut off: {fault}",
        "evicted_after_s": round(evicted_at - cut_at, 2),
        "suspended_after_s": None if suspended is None else round(suspended, 2),
        "last_answer_as_old_owner_s": round(max(by_old) - cut_at, 3),
        "answers_as_old_owner_after_eviction": sum(t > evicted_at for t in by_old),
        "new_uuid": victim.uuid != old,
        "members": len(members),
        "rejoined_after_return_s": round(rejoin, 2),
    }


def _state(node: LocalNode) -> str | None:
    try:
        return node.get("/readyz", timeout=1.0).get("state")
    except OSError:
        return None


def _fault(cluster: FaultCluster, index: int, fault: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The cut and heal of a lone fault on the MN at `index`."""
    import signal

    victim = cluster.nodes[index]
    if fault == "database":
        return cluster.db_proxies[index].cut, cluster.db_proxies[index].heal
    if fault == "broker":
        return cluster.broker_proxies[index].cut, cluster.broker_proxies[index].heal
    if fault == "sigstop":
        return lambda: victim.signal(signal.SIGSTOP), lambda: victim.signal(signal.SIGCONT)
    raise ValueError(f"fault {fault!r}: expected one of {', '.join(LONE_FAULTS)}")


Plan = tuple[str, Callable[[FaultCluster], dict[str, Any]]]


def scenario_names(outages: Sequence[float]) -> list[str]:
    """`rabbitmq-5s`, `postgresql-30s`, ... for each outage length, then `lone-database`, `lone-broker`, ..."""
    return ([f"{kind}-{seconds:g}s" for kind in ("rabbitmq", "postgresql") for seconds in outages]
            + [f"lone-{fault}" for fault in LONE_FAULTS])


def check_names(only: Sequence[str], outages: Sequence[float]) -> None:
    """Raise ValueError naming any scenario in `only` that does not exist."""
    known = scenario_names(outages)
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}: choose from {', '.join(known)}")


def plans(rabbitmq: RabbitMQ, postgres: PostgreSQL, outages: Sequence[float], seed: int, say: Say) -> list[Plan]:
    """Every scenario, in the order and with the names of `scenario_names`."""
    shared: list[Callable[[FaultCluster], dict[str, Any]]] = [
        lambda c, s=server, d=seconds: shared_outage(c, s, d, seed, say)
        for server in (rabbitmq, postgres) for seconds in outages]
    lone = [lambda c, f=fault: lone_cut(c, f, say) for fault in LONE_FAULTS]
    return list(zip(scenario_names(outages), [*shared, *lone], strict=True))


def run(rabbitmq: RabbitMQ, postgres: PostgreSQL, workdir: Path, outages: Sequence[float], seed: int,
        say: Say, only: Sequence[str] = ()) -> dict[str, Any]:
    """The scenarios (those named in `only`, else all) on fresh MNs, a fresh database and a fresh vhost each;
    the benchmark's JSON object."""
    check_names(only, outages)
    chosen = [plan for plan in plans(rabbitmq, postgres, outages, seed, say) if not only or plan[0] in only]
    scenarios: list[dict[str, Any]] = []
    for n, (name, scenario) in enumerate(chosen):
        say(f"[{n + 1}/{len(chosen)}] {name}: starting 3 MNs")
        broker_url = rabbitmq.add_vhost(f"faults-{n}-{uuidlib.uuid4().hex[:6]}")
        database_url = postgres.url_for(postgres.create_database())
        cluster = FaultCluster(broker_url, database_url, workdir / f"s{n}").start()
        try:
            scenarios.append({"scenario": name, **scenario(cluster)})
        finally:
            cluster.close()
    shared = [s for s in scenarios if "uuid_changes" in s]
    lone = [s for s in scenarios if "evicted_after_s" in s]
    checks = {
        "no_uuid_change_on_shared_outages": all(s["uuid_changes"] == 0 for s in shared),
        "ring_back_within_5s": all(s["ring_agreement_after_return_s"] <= 5.0 for s in shared),
        "no_accepted_job_lost": all(s["jobs_lost"] == 0 for s in shared),
        "lone_mn_evicted_within_timeout_plus_2_intervals": all(
            s["evicted_after_s"] <= TIMEOUT + 2 * INTERVAL for s in lone),
        "lone_mn_never_answers_after_eviction": all(s["answers_as_old_owner_after_eviction"] == 0 for s in lone),
        "lone_mn_rejoins_with_new_uuid": all(s["new_uuid"] for s in lone),
    }
    return {"benchmark": "faults", "params": {"mns": 3, "heartbeat_timeout_s": TIMEOUT,
                                              "heartbeat_interval_s": INTERVAL, "seed": seed},
            "scenarios": scenarios, "checks": checks, "targets_met": all(checks.values())}
