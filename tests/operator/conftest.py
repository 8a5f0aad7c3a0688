"""The operator on the devcluster: the ZStackCluster CRD, the operator running as its own ServiceAccount
(proving the Helm chart's RBAC is enough), and one ZStackCluster `demo` per test in external mode
against the session's RabbitMQ and PostgreSQL.

The operator runs on this machine, its MN pods in containers on the devcluster's node, from our image.
Their API is opened to this machine (`spec.api.allowFrom`), where the operator and the tests reach them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.chart import render
from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import (
    InNamespace,
    api_proxy,  # noqa: F401 - the fixture, shared with the Lease tests
    get_json,
    get_text,
    metric,
    pod_ip,
    wait_for,
)
from zstack_devcluster import images as builds
from zstack_devcluster.ports import free_port
from zstack_devcluster.tcpproxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "zstackcluster.yaml"
OPERATOR_NS = "zstack-system"
# The chart's ServiceAccount and RBAC, rendered for a release of this name (a `make demo` release on the same
# devcluster is called zstack-operator: distinct names keep the two apart).
OPERATOR_RELEASE = OPERATOR_SA = "zstack-operator-e2e"
# The MNs' ClusterRole of that release (a `make demo` release owns the default name, zstack-mn).
MN_CLUSTER_ROLE = "zstack-mn-e2e"
CLUSTER = "demo"
MN_SELECTOR = f"app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/component=mn"
PAUSE = "zstack.io/pause-reconciliation"
TIMEOUT = 120.0
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"

MANAGER = "zstack-operator"  # the fieldManager of the operator's server-side applies
LEADER_LEASE = "zstack-operator"  # the operator's leader Lease in OPERATOR_NS

# The children of an external-mode ZStackCluster `demo`, as "Kind/name".
CHILDREN = [
    "StatefulSet/demo-mn", "Service/demo-mn", "Service/demo-api", "ConfigMap/demo-mn-config",
    "Secret/demo-api-token", "ServiceAccount/demo-mn", f"RoleBinding/demo-mn-{MN_CLUSTER_ROLE}",
    "PodDisruptionBudget/demo-mn", "Secret/demo-api-tls", "ConfigMap/demo-api-ca", "NetworkPolicy/demo-mn",
]
# Children whose status a Kubernetes controller writes (the StatefulSet and disruption controllers): their
# resourceVersion moves without the operator, so its own writes show in their generation and managedFields.
STATUS_WRITTEN = ("StatefulSet/demo-mn", "PodDisruptionBudget/demo-mn")
# Leader election of every operator here: room for a few slow Lease calls on a busy host, since a leader that
# misses its renew deadline exits (nothing restarts it in a test). Tests may pass tighter values (later win).
LEASE_ARGS = ("--lease-duration", "8", "--renew-deadline", "5", "--retry-period", "1")


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in recursively (a None value removes the key)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ---- the CRD and the operator's identity -----------------------------------------------------------


@pytest.fixture(scope="session")
def crd(devcluster: KubeCluster) -> None:
    """The ZStackCluster CRD, applied and Established (left in place: other sessions may share the cluster)."""
    devcluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    devcluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                       "crd/zstackclusters.zstack.io")


@pytest.fixture(scope="session")
def operator_rbac(devcluster: KubeCluster, crd: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig of the chart's ServiceAccount in zstack-system, bound by the chart's RBAC (cluster-wide)."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}}
    devcluster.kubectl("apply", "-f", "-", input=json.dumps(namespace))
    rbac = render(OPERATOR_RELEASE, OPERATOR_NS, values={"rbac": {"mnClusterRole": MN_CLUSTER_ROLE}},
                  show_only=("templates/serviceaccount.yaml", "templates/rbac.yaml"))
    devcluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    token = devcluster.kubectl("create", "token", OPERATOR_SA, "-n", OPERATOR_NS,
                               "--duration=2h").stdout.strip()
    admin = yaml.safe_load(devcluster.kubeconfig.read_text())
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [{"name": OPERATOR_SA, "context": {"cluster": "devcluster", "user": OPERATOR_SA,
                                                        "namespace": OPERATOR_NS}}],
        "current-context": OPERATOR_SA,
    }
    path = tmp_path_factory.mktemp("operator-sa") / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def kubeconfig_via(kubeconfig: Path, proxy: TcpProxy, dest: Path) -> Path:
    """A copy of `kubeconfig` that reaches the API server through `proxy`. TLS verification stays on: the
    devcluster's serving certificate names IP 127.0.0.1, the proxy's address (the port is not checked)."""
    doc = yaml.safe_load(kubeconfig.read_text())
    host, port = proxy.address
    for entry in doc["clusters"]:
        entry["cluster"]["server"] = f"https://{host}:{port}"
    dest.write_text(yaml.safe_dump(doc))
    dest.chmod(0o600)
    return dest


# ---- operator processes -----------------------------------------------------------------------------


@dataclass
class OperatorProcess:
    """One `python -m zstack_operator` process logged in as the operator's ServiceAccount."""

    kubeconfig: Path
    log_path: Path
    args: tuple[str, ...] = ()  # extra command-line options (later ones win)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> OperatorProcess:
        argv = [sys.executable, "-m", "zstack_operator", "--all-namespaces",
                "--http-bind", "127.0.0.1", "--http-port", str(self.port),
                "--leader-election-namespace", OPERATOR_NS, "--mn-cluster-role", MN_CLUSTER_ROLE,
                *LEASE_ARGS, *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "POD_", "ZSTACK_"))}
        env["KUBECONFIG"] = str(self.kubeconfig)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.log_path.parent, start_new_session=True)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged_at(self, text: str) -> datetime | None:
        """The local time of the first log line containing `text` (logging's asctime, host clock), or None."""
        for line in self.log().splitlines():
            if text in line:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        return None

    def identity(self) -> str:
        """The leader-election identity this process logged on taking the Lease."""
        found = re.search(r"leading as (\S+)", self.log())
        assert found, f"the operator never logged 'leading as':\n{self.log()[-3000:]}"
        return found.group(1)

    def metrics(self) -> str:
        return get_text(self.url + "/metrics")

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics(), name, **labels)

    def reconciles(self, result: str | None = None) -> float:
        labels = {"result": result} if result else {}
        return self.metric("zstack_operator_reconciles_total", **labels)

    def healthy(self) -> bool:
        if not self.running():
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        return get_text(self.url + "/healthz") is not None

    def leading(self) -> bool:
        return "leading as" in self.log()

    def wait_healthy(self, timeout: float = 60) -> None:
        wait_for(f"the operator's /healthz on port {self.port}", self.healthy, timeout, interval=0.2,
                 info=lambda: self.log()[-4000:])

    def wait_leading(self, timeout: float = 60) -> None:
        self.wait_healthy(timeout)
        wait_for("the operator to log 'leading as'", self.leading, timeout, interval=0.2,
                 info=lambda: self.log()[-4000:])

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit within `timeout`."""
        if not self.running():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the operator ignored SIGTERM for {timeout}s:\n{self.log()[-4000:]}") from None

    def kill(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class OperatorFactory:
    """Starts operator processes for one test; stops every one of them at teardown."""

    kubeconfig: Path
    tmp_path: Path
    started: list[OperatorProcess] = field(default_factory=list, repr=False)

    def __call__(self, *args: str, kubeconfig: Path | None = None) -> OperatorProcess:
        """Start one more operator with the extra options `args`, as the operator's ServiceAccount (through
        `kubeconfig` when given)."""
        op = OperatorProcess(kubeconfig or self.kubeconfig, self.tmp_path / f"operator-{len(self.started)}.log",
                             args)
        self.started.append(op)
        return op.start()

    def logs(self) -> str:
        return "\n".join(f"--- operator-{i} log (tail)\n{op.log()[-4000:]}" for i, op in enumerate(self.started))

    def stop_all(self) -> None:
        """SIGTERM every process; raise (after stopping them all) if one had to be killed."""
        errors = []
        for op in self.started:
            try:
                op.stop(15)
            except AssertionError as err:
                errors.append(str(err))
        assert not errors, "\n".join(errors)


@pytest.fixture
def operator_factory(operator_rbac: Path, tmp_path: Path) -> Iterator[OperatorFactory]:
    """Call it to start another operator process (not waited for)."""
    factory = OperatorFactory(operator_rbac, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def operator(operator_factory: OperatorFactory) -> OperatorProcess:
    """A running operator that leads (its processes are stopped by `operator_factory`, after `zsc`)."""
    op = operator_factory()
    op.wait_leading()
    return op


# ---- one ZStackCluster per test ---------------------------------------------------------------------


class KubectlFailed(KeyError):
    """A kubectl read failed, e.g. an API server timeout on a busy host. A KeyError, so `wait_for` retries it."""

    def __str__(self) -> str:
        return str(self.args[0])


def kubectl_read(cluster: KubeCluster, *args: str) -> str:
    """The output of `kubectl args`; KubectlFailed (with kubectl's error) when it fails."""
    proc = cluster.kubectl(*args, check=False)
    if proc.returncode != 0:
        raise KubectlFailed(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return proc.stdout


@dataclass
class Zsc(InNamespace):
    """The namespace of one test, its ZStackCluster `demo` and ways to look at what the operator made."""

    port: int
    operators: OperatorFactory = field(repr=False)
    name: str = CLUSTER

    def read(self, *args: str) -> str:
        """The output of `kubectl -n NS args`; KubectlFailed when it fails (`wait_for` retries that)."""
        return kubectl_read(self.cluster, "-n", self.ns, *args)

    def get(self, kind: str, name: str = "", selector: str = "") -> Any:
        """The object (or list) as JSON; None only when the named object does not exist (KubectlFailed when
        kubectl fails, so a failed read inside `wait_for` is retried, never taken for "absent")."""
        args = ["get", kind, *([name, "--ignore-not-found"] if name else []), "-o", "json",
                *(["-l", selector] if selector else [])]
        out = self.read(*args)
        return json.loads(out) if out.strip() else None

    def exists(self, kind: str, name: str) -> bool:
        return bool(self.read("get", kind, name, "--ignore-not-found", "-o", "name").strip())

    # ---- the ZStackCluster -------------------------------------------------------------------

    def manifest(self, **overrides: Any) -> dict[str, Any]:
        """The external-mode `demo` with `overrides` merged into its spec (`metadata` merges into metadata)."""
        metadata = overrides.pop("metadata", {})
        spec = {
            "replicas": 3,
            "image": builds.image_name("node"),
            "imagePullPolicy": "Never",  # imported into the node; nothing is ever pulled
            "terminationGracePeriodSeconds": 15,
            "api": {"port": self.port, "allowFrom": [{"namespaceSelector": {}}, self.cluster.this_machine()]},
            "broker": {"external": {"secretRef": {"name": "external-broker", "key": "url"}}},
            "database": {"external": {"secretRef": {"name": "external-database", "key": "url"}}},
        }
        return {"apiVersion": "zstack.io/v1alpha1", "kind": "ZStackCluster",
                "metadata": deep_merge({"name": self.name, "namespace": self.ns}, metadata),
                "spec": deep_merge(spec, overrides)}

    def apply(self, manifest: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        manifest = manifest or self.manifest(**overrides)
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        return self.cr()

    def cr(self) -> dict[str, Any]:
        cr = self.get("zsc", self.name)
        assert cr is not None, f"ZStackCluster {self.ns}/{self.name} does not exist"
        return cr

    def status(self) -> dict[str, Any]:
        return self.cr().get("status") or {}

    def patch(self, patch: dict[str, Any]) -> None:
        self.kubectl("patch", "zsc", self.name, "--type=merge", "-p", json.dumps(patch))

    def scale(self, replicas: int) -> None:
        self.kubectl("scale", f"zsc/{self.name}", f"--replicas={replicas}")

    def condition(self, kind: str) -> dict[str, Any] | None:
        for cond in self.status().get("conditions") or []:
            if cond.get("type") == kind:
                return cond
        return None

    def wait_condition(self, kind: str, status: str = "True", timeout: float = TIMEOUT) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.condition(kind)
            return cond if cond and cond.get("status") == status else None

        return wait_for(f"condition {kind}={status} on {self.ns}/{self.name}", check, timeout, interval=0.2,
                        info=self.describe)

    def wait_status(self, what: str, check: Callable[[dict[str, Any]], bool],
                    timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait until `check(status)` holds; returns that status."""
        def probe() -> dict[str, Any] | None:
            status = self.status()
            return status if check(status) else None

        return wait_for(what, probe, timeout, interval=0.2, info=self.describe)

    def wait_summary(self, summary: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.wait_status(f"status.ring.summary {summary!r}",
                                lambda s: (s.get("ring") or {}).get("summary") == summary, timeout)

    # ---- children ----------------------------------------------------------------------------

    def children(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The existing ones of `names` ("Kind/name", default CHILDREN) by "Kind/name"."""
        wanted = names or CHILDREN
        out = self.read("get", *[n.lower() for n in wanted], "--ignore-not-found", "-o", "json")
        items = json.loads(out)["items"] if out.strip() else []
        return {f"{item['kind']}/{item['metadata']['name']}": item for item in items}

    def writes(self, names: list[str] | None = None,
               status_written: tuple[str, ...] = STATUS_WRITTEN) -> dict[str, Any]:
        """What changes when the operator writes a child, by "Kind/name": its resourceVersion, or for the
        children in `status_written` its generation and the operator's managedFields entries."""
        marks: dict[str, Any] = {}
        for key, obj in self.children(names).items():
            meta = obj["metadata"]
            marks[key] = ((meta.get("generation"), operator_fields(obj)) if key in status_written
                          else meta["resourceVersion"])
        return marks

    def settled(self, what: str, read: Callable[[], Any], quiet: float = 3.0) -> Any:
        """`read()` once it returned the same value for `quiet` seconds."""
        last: dict[str, Any] = {"value": None, "since": 0.0}

        def check() -> Any:
            value, now = read(), time.monotonic()
            if value != last["value"]:
                last.update(value=value, since=now)
                return None
            return value if now - last["since"] >= quiet else None

        return wait_for(f"{what} to settle", check, TIMEOUT, interval=0.5, info=self.describe)

    def statefulset(self) -> dict[str, Any] | None:
        return self.get("statefulset", f"{self.name}-mn")

    def wait_sts_replicas(self, replicas: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            sts = self.statefulset()
            return sts if sts and sts["spec"]["replicas"] == replicas else None

        return wait_for(f"StatefulSet {self.name}-mn to have spec.replicas {replicas}", check, timeout,
                        interval=0.2, info=self.describe)

    # ---- MN pods -----------------------------------------------------------------------------

    def pod_names(self, replicas: int) -> list[str]:
        return [f"{self.name}-mn-{i}" for i in range(replicas)]

    def pods(self) -> list[dict[str, Any]]:
        return (self.get("pods", selector=MN_SELECTOR) or {}).get("items") or []

    def pod(self, name: str) -> dict[str, Any] | None:
        return self.get("pod", name)

    def ip(self, name: str) -> str:
        return pod_ip(self.pod(name), name)

    def ca(self) -> str:
        """The cluster's CA certificate (PEM), from the ConfigMap <name>-api-ca the operator writes."""
        return json.loads(self.read("get", "configmap", f"{self.name}-api-ca", "-o", "json"))["data"]["ca.crt"]

    @property
    def api_server_name(self) -> str:
        """The API Service's name, which the MNs' certificate holds (for zstack-cli --tls-server-name)."""
        return f"{self.name}-api.{self.ns}.svc"

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the MNs against the cluster's CA. Pod IPs are in no certificate: like the operator, tests
        dial them and check the chain only."""
        context = ssl.create_default_context(cadata=self.ca())
        context.check_hostname = False
        return context

    def url(self, name: str, path: str) -> str:
        """`path` on MN pod `name`, over HTTPS unless the spec opts out."""
        tls = (self.cr()["spec"].get("api") or {}).get("tls") or {}
        scheme = "http" if tls.get("enabled") is False else "https"
        return f"{scheme}://{self.ip(name)}:{self.port}{path}"

    def ring(self, name: str) -> dict[str, Any]:
        """The MN's GET /v1/cluster/ring: self, epoch, members, state."""
        url = self.url(name, "/v1/cluster/ring")
        return get_json(url, timeout=1.0, context=self.ssl_context() if url.startswith("https") else None)

    def rings(self, names: list[str]) -> dict[str, dict[str, Any]]:
        return {name: self.ring(name) for name in names}

    def wait_rings(self, count: int, timeout: float = TIMEOUT) -> dict[str, dict[str, Any]]:
        """Wait until pods -0..-(count-1) run MNs that all hold one ring of exactly themselves."""
        names = self.pod_names(count)

        def agreed() -> dict[str, dict[str, Any]] | None:
            rings = self.rings(names)
            views = {frozenset(r["members"]) for r in rings.values()}
            selves = {r["self"] for r in rings.values()}
            ok = (len(views) == 1 and selves == next(iter(views)) and len(selves) == count
                  and all(r["state"] == "running" for r in rings.values()))
            return rings if ok else None

        return wait_for(f"{count} MNs to agree on one ring", agreed, timeout, interval=0.2, info=self.describe)

    def wait_pods_gone(self, names: list[str] | None = None, timeout: float = TIMEOUT) -> None:
        """Wait until the named MN pods (default: all) no longer exist."""
        def gone() -> bool:
            left = {p["metadata"]["name"] for p in self.pods()}
            return not (left & set(names) if names is not None else left)

        wait_for(f"MN pods {names or 'all'} to be gone", gone, timeout, interval=0.2, info=self.describe)

    def log(self, name: str) -> str:
        """Every run's log of the MN container of pod `name`, also after the pod is deleted."""
        return self.cluster.pod_log(self.ns, name, "mn")

    def describe(self) -> str:
        cr = self.kubectl("get", "zsc", self.name, "-o", "yaml", check=False)
        objects = self.kubectl("get", "statefulsets,pods,leases", "-o", "wide", check=False)
        events = self.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False)
        pods = (super().get("pods", selector=MN_SELECTOR) or {}).get("items") or []  # None if kubectl fails
        mns = "\n".join(f"--- {p['metadata']['name']} log (tail)\n{self.log(p['metadata']['name'])[-1500:]}"
                        for p in pods)
        return f"--- ZStackCluster\n{cr}\n{objects}\n--- events\n{events[-3000:]}\n{mns}\n{self.operators.logs()}"


def operator_fields(obj: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The managedFields entries of the operator's field manager: (operation, subresource, time, fieldsV1)."""
    return sorted((entry.get("operation", ""), entry.get("subresource", ""), entry.get("time", ""),
                   json.dumps(entry.get("fieldsV1"), sort_keys=True))
                  for entry in obj["metadata"].get("managedFields") or [] if entry.get("manager") == MANAGER)


def printer_columns(table: str) -> list[dict[str, str]]:
    """Rows of a `kubectl get` table as dicts keyed by header, split at the header's column starts."""
    header, *rows = table.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{name: row[a:b].strip() for name, (a, b) in zip(names, bounds, strict=True)} for row in rows]


@pytest.fixture
def zsc(devcluster: KubeCluster, crd: None, operator_factory: OperatorFactory, fresh_database: str,
        fresh_vhost: str, pods_reach: Callable[[str], str]) -> Iterator[Zsc]:
    """A fresh namespace holding the Secrets external-broker and external-database (key `url`); `apply()`
    creates the ZStackCluster. Teardown deletes it and waits for the MN pods to go before the database is
    dropped, and before the operators stop."""
    ns = f"zsc-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", ns)
    # Every pod the operator makes must pass Pod Security "restricted": the API server refuses any other here.
    devcluster.kubectl("label", "namespace", ns, f"{PSA_ENFORCE}=restricted")
    for secret, url in (("external-broker", fresh_vhost), ("external-database", fresh_database)):
        devcluster.kubectl("-n", ns, "create", "secret", "generic", secret, f"--from-literal=url={pods_reach(url)}")
    cluster = Zsc(devcluster, ns, free_port(), operator_factory)
    try:
        yield cluster
    finally:
        devcluster.kubectl("-n", ns, "delete", "zsc", "--all", "--wait=false", check=False)
        devcluster.kubectl("-n", ns, "delete", "statefulset", "--all", "--wait=false", check=False)
        try:
            cluster.wait_pods_gone(timeout=60)
        finally:
            devcluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
