"""MN pods on the devcluster's container node: a plain StatefulSet of our `zstack-node` image, its
ServiceAccount bound to node/zstack_node/manifests/mn-rbac.yaml, real RabbitMQ and PostgreSQL (on this
machine, reached at the host's end of the node's veth). One namespace, database and vhost per test.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KubeCluster
from zstack_devcluster import images as builds
from zstack_devcluster.ports import free_port
from zstack_devcluster.tcpproxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
RBAC = REPO / "node" / "zstack_node" / "manifests" / "mn-rbac.yaml"
CLUSTER = "demo"
STS = f"{CLUSTER}-mn"
SA = "zstack-mn"
# The manifest's ClusterRole, renamed: a `make demo` release on the same devcluster owns the name zstack-mn.
MN_CLUSTER_ROLE = "zstack-mn-k8s-tests"
LEASE_DURATION = 5.0  # the defaults of zstack-node
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 4.0


def mn_rbac(cluster_role: str) -> str:
    """node/zstack_node/manifests/mn-rbac.yaml with its ClusterRole (and the binding's roleRef) renamed."""
    docs = list(yaml.safe_load_all(RBAC.read_text()))
    for doc in docs:
        if doc["kind"] == "ClusterRole":
            doc["metadata"]["name"] = cluster_role
        elif doc["kind"] == "RoleBinding":
            doc["roleRef"]["name"] = cluster_role
    return yaml.safe_dump_all(docs)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.1,
             info: Callable[[], str] | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (plus `info()`) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{info()}" if info else ""))
        time.sleep(interval)


def get_json(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        return json.load(err)


def get_text(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def pod_ip(pod: dict[str, Any] | None, name: str) -> str:
    """The pod's IP; KeyError (which `wait_for` retries) while the pod or its IP does not exist yet."""
    if pod is None:
        raise KeyError(f"pod {name} does not exist (yet)")
    return pod["status"]["podIP"]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(4))
    return total


@dataclass
class InNamespace:
    """kubectl and `get` in one test's namespace of the devcluster."""

    cluster: KubeCluster
    ns: str

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.cluster.kubectl("-n", self.ns, *args, check=check, input=input).stdout

    def get(self, kind: str, name: str = "", selector: str = "") -> Any:
        """The object (or list) as JSON, None when it does not exist."""
        args = ["get", kind, *([name] if name else []), "-o", "json", *(["-l", selector] if selector else [])]
        out = self.cluster.kubectl("-n", self.ns, *args, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None


@dataclass
class MnPods(InNamespace):
    """The StatefulSet `demo-mn` in one namespace, and ways to look at its MNs."""

    port: int
    broker_url: str
    database_url: str
    replicas: int = 3
    extra_env: dict[str, str] = field(default_factory=dict)
    _api: Any = field(default=None, repr=False)

    # ---- the API ---------------------------------------------------------------------------

    @property
    def core(self) -> Any:
        if self._api is None:
            from kubernetes import client

            self._api = client.CoreV1Api(self.cluster.api_client())
        return self._api

    def describe(self) -> str:
        pods = self.kubectl("get", "pods,leases", "-o", "wide", check=False)
        events = self.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False)
        logs = "\n".join(f"--- {name} log\n{self.log(name)[-3000:]}" for name in self.names())
        return f"{pods}\n--- events\n{events[-3000:]}\n{logs}"

    # ---- the StatefulSet -------------------------------------------------------------------

    def statefulset(self) -> dict[str, Any]:
        labels = {"app.kubernetes.io/name": "zstack", "app.kubernetes.io/instance": CLUSTER,
                  "app.kubernetes.io/component": "mn", "zstack.io/cluster": CLUSTER}
        field_env = [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                     ("POD_IP", "status.podIP")]
        env = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": f}}} for n, f in field_env] + [
            {"name": "ZSTACK_HTTP_BIND", "value": "$(POD_IP)"},
            {"name": "ZSTACK_HTTP_PORT", "value": str(self.port)},
            {"name": "ZSTACK_ADVERTISE_ADDRESS", "value": "$(POD_IP)"},
            {"name": "ZSTACK_BROKER_URL", "value": self.broker_url},
            {"name": "ZSTACK_DATABASE_URL", "value": self.database_url},
            {"name": "ZSTACK_CLUSTER", "value": CLUSTER},
        ] + [{"name": k, "value": v} for k, v in self.extra_env.items()]
        container = {
            "name": "mn", "image": builds.image_name("node"), "imagePullPolicy": "Never", "env": env,
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": self.port}, "periodSeconds": 1},
        }
        return {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": STS, "labels": labels},
            "spec": {
                "replicas": self.replicas, "serviceName": STS, "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {k: labels[k] for k in ("app.kubernetes.io/instance",
                                                                     "app.kubernetes.io/component")}},
                "template": {"metadata": {"labels": labels},
                             "spec": {"serviceAccountName": SA, "terminationGracePeriodSeconds": 15,
                                      "containers": [container]}},
            },
        }

    def deploy(self) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(self.statefulset()))
        self.wait_agreed(self.replicas, timeout=120)

    def names(self) -> list[str]:
        return [f"{STS}-{i}" for i in range(self.replicas)]

    def pod(self, name: str) -> dict[str, Any] | None:
        return self.get("pod", name)

    def ip(self, name: str) -> str:
        return pod_ip(self.pod(name), name)

    def url(self, name: str, ip: str | None = None) -> str:
        return f"http://{ip or self.ip(name)}:{self.port}"

    def ring(self, name: str, ip: str | None = None) -> dict[str, Any]:
        return get_json(self.url(name, ip) + "/v1/cluster/ring", timeout=1.0)

    def metrics(self, name: str) -> str:
        return get_text(self.url(name) + "/metrics")

    def rings(self) -> dict[str, dict[str, Any]]:
        return {name: self.ring(name) for name in self.names()}

    def wait_agreed(self, count: int, timeout: float = 60) -> dict[str, dict[str, Any]]:
        """Wait until every MN runs and all rings hold the same `count` members, one per pod."""
        def agreed() -> dict[str, dict[str, Any]] | None:
            rings = self.rings()
            views = {frozenset(r["members"]) for r in rings.values()}
            selves = {r["self"] for r in rings.values()}
            ok = (len(views) == 1 and len(next(iter(views))) == count and selves == next(iter(views))
                  and all(r["state"] == "running" for r in rings.values()))
            return rings if ok else None

        return wait_for(f"{count} MNs to agree on one ring", agreed, timeout, info=self.describe)

    def lease(self, name: str) -> dict[str, Any] | None:
        return self.get("lease", name)

    def pid(self, name: str) -> int:
        """The host PID of the pod's running MN container (its main process: zstack-node)."""
        return wait_for(f"the MN container of {name} to run", lambda: self.cluster.container_pid(self.ns, name, "mn"),
                        30)

    def log(self, name: str) -> str:
        """What the MN container of pod `name` wrote, over every restart."""
        return self.cluster.pod_log(self.ns, name, "mn")


class RingRecorder:
    """Samples the rings of some MNs in threads, with monotonic timestamps, until stopped."""

    def __init__(self, pods: MnPods, names: list[str], period: float = 0.02) -> None:
        self.samples: dict[str, list[tuple[float, dict[str, Any] | None]]] = {n: [] for n in names}
        self._ips = {n: pods.ip(n) for n in names}
        self._pods, self._period = pods, period
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in names]

    def __enter__(self) -> RingRecorder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                ring = self._pods.ring(name, self._ips[name])
            except (OSError, ValueError):
                ring = None
            self.samples[name].append((time.monotonic(), ring))
            self._stop.wait(self._period)

    def first_without(self, name: str, mn: str, after: float) -> float | None:
        """When `name`'s ring first lacked `mn` (a running MN's ring), or None."""
        for at, ring in self.samples[name]:
            if at >= after and ring and ring.get("state") == "running" and mn not in ring["members"]:
                return at
        return None


@pytest.fixture
def api_proxy(devcluster: KubeCluster) -> Iterator[TcpProxy]:
    """A TcpProxy in front of the devcluster's API server (its address from the admin kubeconfig)."""
    import yaml

    server = yaml.safe_load(devcluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = re.fullmatch(r"https://([^:/]+):(\d+)/?", server).groups()
    proxy = TcpProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def mn_pods(devcluster: KubeCluster, fresh_database: str, fresh_vhost: str,
            pods_reach: Callable[[str], str]) -> Iterator[MnPods]:
    """A fresh namespace with the MN ServiceAccount and RBAC; `deploy()` starts the 3 MN pods."""
    ns = f"mn-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", ns)
    devcluster.kubectl("-n", ns, "apply", "-f", "-", input=mn_rbac(MN_CLUSTER_ROLE))
    pods = MnPods(devcluster, ns, free_port(), pods_reach(fresh_vhost), pods_reach(fresh_database))
    try:
        yield pods
    finally:
        devcluster.kubectl("-n", ns, "delete", "statefulset", STS, "--wait=false", check=False)
        devcluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        # The database is dropped next: wait for the MNs to leave so that they do not log a DB outage.
        wait_for("the MN pods to go", lambda: not (pods.get("pods", selector="app.kubernetes.io/component=mn")
                                                   or {}).get("items"), 60)
