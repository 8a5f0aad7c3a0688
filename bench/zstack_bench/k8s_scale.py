"""`zstack-bench k8s-scale`: the operator on the devcluster, scaling a ZStackCluster and rolling out spec changes.

The devcluster runs a container node (`zstack-dev up --node containers`): MN pods run our node image, imported
into the node's containerd and never pulled. Pods reach this machine only at the host's end of the node's veth,
so the broker and database URLs in the clusters' Secrets must be ones pods reach there, and the MNs' API is
opened to that address (`spec.api.allowFrom`), where the operator and the ring pollers come from.

In a fresh namespace, with the operator running as a subprocess (admin kubeconfig, no leader election):

- ZStackCluster `demo` (3 MNs, external mode) is scaled 3 -> 5 through the scale subresource, like
  `kubectl scale`. The MN pods are polled through the API and every MN's /v1/cluster/ring over HTTP (one
  thread per MN), every ~20 ms: t_ready is when the last new pod is Ready, t_ring when all 5 MNs report
  the same 5 members. ring_after_ready_s = t_ring - t_ready (negative: the ring agreed before the kubelet
  reported the pods Ready). Then 5 -> 3: the time until the 3 remaining MNs hold exactly themselves.
  It includes the operator's preStop sleep of 1 s before each leaver gets SIGTERM.
- ZStackCluster `idle` (0 replicas, so no pods churn) gets `changes` spec.pod.annotations changes; each is
  timed from the PATCH response until a watch on StatefulSet idle-mn, open since before the first change,
  delivers the new template annotation. Baseline, interleaved: the same for a direct PATCH of a plain
  StatefulSet's template annotation (API server plus watch delivery alone; a sample is negative when the
  event came in before the PATCH response was read).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zstack_bench.stats import percentile, summary
from zstack_devcluster import controlplane, state, tools
from zstack_devcluster.containernode import images as node_images
from zstack_devcluster.containernode.config import PAUSE_IMAGE
from zstack_devcluster.containernode.network import NodeNetwork
from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.images import image_name
from zstack_devcluster.layout import Layout
from zstack_devcluster.ports import free_port
from zstack_kube.client import JSON, MERGE_PATCH
from zstack_kube.errors import ApiError
from zstack_kube.login import login
from zstack_operator.cluster import GROUP, VERSION
from zstack_operator.kubeapi import Kube, path

Say = Callable[[str], None]
REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "zstackcluster.yaml"
POLL_S = 0.02
TIMEOUT_S = 180.0
CHANGE_GAP_S = 0.2  # idle time between two spec changes, so that each one is handled on its own
ANNOTATION = "bench.zstack.io/change"
RING_AFTER_READY_TARGET_S = 2.0  # the README's performance table
SCALE_DOWN_TARGET_S = 3.0  # graceful leave within 1 s (README), plus the 1 s preStop sleep, plus pod deletion
SPEC_P99_TARGET_S = 1.0  # issue 6


class BenchError(RuntimeError):
    """The benchmark could not do its work (no devcluster, an API error, a cluster that never got ready)."""


@dataclass(frozen=True)
class Devcluster:
    """A running devcluster with a container node: its admin kubeconfig and the node's network."""

    kubeconfig: Path
    network: NodeNetwork

    @property
    def pod_network(self) -> tuple[str, str]:
        """(address, clients) for `Service.serve_pods`: the host's end of the node's veth, and the pods' network."""
        return self.network.host_ip, self.network.pod_cidr

    def this_machine(self) -> dict[str, Any]:
        """A NetworkPolicy peer for this machine, where the operator and the ring pollers run."""
        return {"ipBlock": {"cidr": f"{self.network.host_ip}/32"}}


def node_network(root: Path) -> NodeNetwork:
    """The network of the devcluster's container node; BenchError when it runs none."""
    index = state.load(root).node_index
    if index is None:
        raise BenchError(f"the devcluster in {root} has no container node (k8s-scale runs the MNs in containers): "
                         f"`zstack-dev down --dir {root}`, then `zstack-dev up --node containers --dir {root}` "
                         "(needs root)")
    return NodeNetwork(index)


def check_node_image() -> None:
    """BenchError unless `zstack-dev images` wrote the node image, which a private devcluster imports."""
    built = {name for archive in node_images.project_archives() for name in node_images.archive_images(archive)}
    if image_name("node") not in built:
        raise BenchError(f"image {image_name('node')} is not built: run `zstack-dev images` first")


@contextlib.contextmanager
def devcluster(dev_dir: Path | None, say: Say) -> Iterator[Devcluster]:
    """The running devcluster in `dev_dir`, or a private one with a container node started now."""
    if dev_dir is not None:
        dev_dir = dev_dir.expanduser().resolve()
        if not controlplane.is_up(dev_dir):
            raise BenchError(f"--dev-dir {dev_dir}: no running devcluster there; start one with "
                             f"`zstack-dev up --node containers --dir {dev_dir}`")
        yield Devcluster(Layout(dev_dir).kubeconfig, node_network(dev_dir))
        return
    check_node_image()
    root = Path(tempfile.mkdtemp(prefix="zstack-bench-k8s-"))
    say(f"no --dev-dir given: starting a private devcluster with a container node in {root}")
    try:
        try:
            kubeconfig = controlplane.up(root, say=say, node="containers").kubeconfig
        except DevclusterError as err:
            raise BenchError(f"the private devcluster could not start: {err}") from None
        yield Devcluster(kubeconfig, node_network(root))
    finally:
        controlplane.down(root, say=say)
        shutil.rmtree(root, ignore_errors=True)


class Api(Kube):
    """The operator's `Kube` logged in with a kubeconfig; errors name the request. Adds what `Kube` does not do:
    raw requests, a streamed watch, and kubectl."""

    def __init__(self, kubeconfig: Path) -> None:
        super().__init__(login(kubeconfig))
        self.kubeconfig = kubeconfig

    def request(self, method: str, url: str, *, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = JSON) -> dict[str, Any]:
        try:
            return self.client.request(method, url, query=query, body=body, content_type=content_type)
        except ApiError as exc:
            raise ApiError(exc.status, f"{method} {url}: {exc.message}", exc.reason) from None

    def watch(self, url: str, query: dict[str, Any]) -> Any:
        """The urllib3 response of a watch on `url`, body unread and without a read timeout; ApiError unless 2xx."""
        try:
            return self.client.open_watch(url, read_timeout=None, **query)
        except ApiError as exc:
            raise ApiError(exc.status, f"GET {url} (watch): {exc.message}", exc.reason) from None

    def kubectl(self, *args: str) -> str:
        argv = [str(tools.tool_path("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout


def _observer_tls() -> ssl.SSLContext:
    """The bench only watches each MN's ring (public, no token): the clusters' default HTTPS, unverified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


OBSERVER_TLS = _observer_tls()


def get_json(url: str, timeout: float = 0.5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout, context=OBSERVER_TLS) as response:
        return json.load(response)


def wait_until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT_S, interval: float = POLL_S,
               info: Callable[[], str] | None = None) -> Any:
    """Call `check` until it returns something truthy; BenchError naming `what` (plus `info()`) on timeout."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}" + (f"\n{info()}" if info else ""))
        time.sleep(interval)
    return result


def pod_ready(pod: dict[str, Any] | None) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def pod_waiting(pod: dict[str, Any]) -> str:
    """Why the pod's containers wait (e.g. ErrImageNeverPull: the node lacks the image), or ""."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    reasons = [f"{c['name']} {w.get('reason')}: {w.get('message', '')}".rstrip(": ")
               for c in statuses if (w := (c.get("state") or {}).get("waiting"))]
    return f" waiting ({'; '.join(reasons)})" if reasons else ""


def operator_env(kubeconfig: Path) -> dict[str, str]:
    """The operator's environment: ours without Kubernetes and ZStack settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "POD_", "ZSTACK_"))}
    env["KUBECONFIG"] = str(kubeconfig)
    return env


class Operator:
    """`python -m zstack_operator` watching one namespace, logged in with the admin kubeconfig.

    It runs in `workdir` and logs to operator.log there."""

    def __init__(self, kubeconfig: Path, namespace: str, workdir: Path) -> None:
        argv = [sys.executable, "-m", "zstack_operator", "-n", namespace, "--no-leader-election",
                "--http-bind", "127.0.0.1", "--http-port", str(free_port())]
        self.log_path = workdir / "operator.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=workdir, env=operator_env(kubeconfig), start_new_session=True)

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the operator exited with {self.proc.returncode}; its log ends with:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class RingPoller:
    """GET /v1/cluster/ring of each named MN pod, one thread each; notes when they first hold exactly themselves."""

    def __init__(self, names: list[str], port: int, ips: dict[str, str]) -> None:
        self.names, self.port, self.ips = names, port, ips
        self.views: dict[str, tuple[str, frozenset[str], str]] = {}
        self.agreed_at: float | None = None
        self.members: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(n,), daemon=True, name=f"ring-{n}") for n in names]

    def __enter__(self) -> RingPoller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _poll(self, name: str) -> None:
        while not self._stop.is_set():
            ip = self.ips.get(name)
            if ip:
                try:
                    ring = get_json(f"https://{ip}:{self.port}/v1/cluster/ring")
                    self._seen(name, (ring["self"], frozenset(ring["members"]), ring["state"]), time.monotonic())
                except (OSError, ValueError, KeyError, TypeError):
                    pass  # not listening yet, or gone
            self._stop.wait(POLL_S)

    def _seen(self, name: str, view: tuple[str, frozenset[str], str], now: float) -> None:
        with self._lock:
            self.views[name] = view
            if self.agreed_at is None and len(self.views) == len(self.names):
                selves = frozenset(v[0] for v in self.views.values())
                if len(selves) == len(self.names) and all(v[1] == selves and v[2] == "running"
                                                          for v in self.views.values()):
                    self.agreed_at, self.members = now, selves

    def describe(self) -> str:
        with self._lock:
            return "; ".join(f"{n}: self {v[0][:8]} state {v[2]} members {len(v[1])}"
                             for n, v in sorted(self.views.items())) or "no MN answered"


class TemplateWatch:
    """A watch on one StatefulSet, opened before any change: when each value of a template annotation arrived."""

    def __init__(self, api: Api, namespace: str, name: str) -> None:
        self.api, self.path, self.name = api, path("StatefulSet", namespace), name
        self.seen: dict[str, float] = {}
        self.failure: str | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._rv = ""
        self._resp = self._connect()
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"watch-{name}")
        self._thread.start()

    def _connect(self) -> Any:
        selector = f"metadata.name={self.name}"
        if not self._rv:
            self._rv = self.api.request("GET", self.path, query={"fieldSelector": selector})["metadata"][
                "resourceVersion"]
        return self.api.watch(self.path, {"fieldSelector": selector, "resource_version": self._rv,
                                          "timeout_seconds": 600})

    def _read(self) -> None:
        while not self._stopped:
            try:
                for line in self._resp:
                    if line.strip():
                        self._event(time.monotonic(), json.loads(line))
                if not self._stopped:
                    self._resp = self._connect()  # the server ended the watch: go on from the last version
            except Exception as exc:  # stop() shuts the socket; anything else ends the watch too
                if not self._stopped:
                    with self._cond:
                        self.failure = f"{type(exc).__name__}: {exc}"
                        self._cond.notify_all()
                return

    def _event(self, now: float, event: dict[str, Any]) -> None:
        obj = event["object"]
        if event["type"] == "ERROR":
            self._rv = ""  # e.g. 410 Gone: list again
            return
        self._rv = obj["metadata"]["resourceVersion"]
        if event["type"] == "BOOKMARK":
            return
        value = ((obj["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
        with self._cond:
            if value is not None and value not in self.seen:
                self.seen[value] = now
                self._cond.notify_all()

    def wait(self, value: str, timeout: float = 30.0) -> float:
        """The monotonic time the watch delivered `value`."""
        with self._cond:
            self._cond.wait_for(lambda: value in self.seen or self.failure, timeout)
        if value in self.seen:
            return self.seen[value]
        raise BenchError(f"the watch on StatefulSet {self.name} did not see {ANNOTATION}={value} within "
                         f"{timeout:g}s" + (f": the watch failed ({self.failure})" if self.failure else ""))

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(Exception):
            self._resp.shutdown()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._resp.release_conn()


class Bench:
    """One run: a namespace, its Secrets, the operator, ZStackClusters `demo` and `idle` and StatefulSet `baseline`."""

    def __init__(self, cluster: Devcluster, broker_url: str, database_url: str, workdir: Path, say: Say) -> None:
        self.api, self.cluster, self.say = Api(cluster.kubeconfig), cluster, say
        self.broker_url, self.database_url, self.workdir = broker_url, database_url, workdir
        self.ns = f"zstack-bench-{secrets.token_hex(4)}"
        self.port = free_port()
        self.ips: dict[str, str] = {}
        self.operator: Operator | None = None

    # ---- small requests -------------------------------------------------------------------------------

    def demo(self) -> dict[str, Any]:
        """ZStackCluster demo; ApiError if it is missing."""
        return self.api.request("GET", path("ZStackCluster", self.ns, "demo"))

    def merge_patch(self, kind: str, name: str, body: dict[str, Any], sub: str = "") -> None:
        self.api.request("PATCH", path(kind, self.ns, name, sub), body=body, content_type=MERGE_PATCH)

    def mn_pods(self, cluster: str = "demo") -> dict[str, dict[str, Any]]:
        """The cluster's MN pods by name; remembers their IPs for the ring pollers."""
        items = self.api.list("Pod", self.ns, f"app.kubernetes.io/instance={cluster},app.kubernetes.io/component=mn")
        pods = {p["metadata"]["name"]: p for p in items}
        for name, pod in pods.items():
            if ip := (pod.get("status") or {}).get("podIP"):
                self.ips[name] = ip
        return pods

    def scale(self, replicas: int) -> float:
        """Patch the scale subresource of `demo` as `kubectl scale` does; the monotonic time of the response."""
        self.merge_patch("ZStackCluster", "demo", {"spec": {"replicas": replicas}}, sub="scale")
        return time.monotonic()

    def describe(self) -> str:
        """The demo cluster's conditions, its pods and the operator's log tail, for error messages."""
        lines = []
        with contextlib.suppress(ApiError):
            status = self.demo().get("status") or {}
            lines.append(f"demo ring: {(status.get('ring') or {}).get('summary')}")
            lines += [f"  {c['type']}={c['status']} {c.get('reason')}: {c.get('message')}"
                      for c in status.get("conditions") or []]
            lines += [f"pod {n}: {(p.get('status') or {}).get('phase')} ready={pod_ready(p)}{pod_waiting(p)}"
                      for n, p in sorted(self.mn_pods().items())]
        if self.operator is not None:
            lines.append(f"--- operator log (tail)\n{self.operator.tail()}")
        return "\n".join(lines)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = TIMEOUT_S,
             info: Callable[[], str] | None = None) -> Any:
        def alive_and(check: Callable[[], Any] = check) -> Any:
            if self.operator is not None:
                self.operator.check_alive()
            return check()

        return wait_until(what, alive_and, timeout, info=info or self.describe)

    # ---- setup and teardown ---------------------------------------------------------------------------

    def setup(self) -> None:
        if not CRD.is_file():
            raise BenchError(f"the ZStackCluster CRD is missing: {CRD}")
        self.api.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        self.api.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/zstackclusters.zstack.io")
        self.api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": self.ns}})
        self.say(f"k8s-scale: namespace {self.ns}; starting the operator")
        for name, url in (("bench-broker", self.broker_url), ("bench-database", self.database_url)):
            self.api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": self.ns},
                             "stringData": {"url": url}})
        self.operator = Operator(self.api.kubeconfig, self.ns, self.workdir)
        for name, replicas in (("demo", 3), ("idle", 0)):
            self.api.create(self.zstackcluster(name, replicas))
        self.api.create(self.baseline_statefulset())

    def zstackcluster(self, name: str, replicas: int) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ZStackCluster",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"replicas": replicas, "image": image_name("node"), "imagePullPolicy": "Never",
                         "terminationGracePeriodSeconds": 15,
                         "api": {"port": self.port,
                                 "allowFrom": [{"namespaceSelector": {}}, self.cluster.this_machine()]},
                         "broker": {"external": {"secretRef": {"name": "bench-broker", "key": "url"}}},
                         "database": {"external": {"secretRef": {"name": "bench-database", "key": "url"}}}}}

    def baseline_statefulset(self) -> dict[str, Any]:
        """0 replicas, so it never runs; the node's pause image, so nothing could ever be pulled either."""
        labels = {"app.kubernetes.io/name": "zstack-bench-baseline"}
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "baseline", "namespace": self.ns},
                "spec": {"replicas": 0, "serviceName": "baseline", "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels},
                                      "spec": {"containers": [{"name": "idle", "image": PAUSE_IMAGE,
                                                               "imagePullPolicy": "Never"}]}}}}

    def teardown(self) -> None:
        """Delete the clusters and StatefulSets, wait until the MN pods left, stop the operator, drop the namespace."""
        for kind, name in (("ZStackCluster", "demo"), ("ZStackCluster", "idle"), ("StatefulSet", "demo-mn"),
                           ("StatefulSet", "baseline")):
            with contextlib.suppress(ApiError):
                self.api.delete(kind, self.ns, name)
        try:
            wait_until("the MN pods to be gone", lambda: not self.mn_pods(), 90, interval=0.2)
        except Exception as exc:  # keep cleaning up; an error of the run itself matters more
            self.say(f"k8s-scale: cleanup of {self.ns}: {exc}")
        if self.operator is not None:
            self.operator.stop()
        with contextlib.suppress(Exception):
            self.api.request("DELETE", f"/api/v1/namespaces/{self.ns}")

    # ---- measurements ---------------------------------------------------------------------------------

    def wait_ready(self) -> None:
        def ready() -> bool:
            status = self.demo().get("status") or {}
            conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
            return conditions.get("Ready") == "True" and (status.get("ring") or {}).get("summary") == "3/3"
        self.wait("ZStackCluster demo to be Ready with ring 3/3", ready)
        self.wait("StatefulSet idle-mn to exist", lambda: self.api.get("StatefulSet", self.ns, "idle-mn"))

    def scale_up(self, names: list[str]) -> dict[str, float]:
        """3 -> 5: seconds from the scale request until the new pods are Ready and until all 5 rings agree."""
        new = names[3:]
        with RingPoller(names, self.port, self.ips) as rings:
            sent = self.scale(len(names))
            ready_at: list[float] = []

            def done() -> bool:
                pods, now = self.mn_pods(), time.monotonic()
                if not ready_at and all(pod_ready(pods.get(n)) for n in new):
                    ready_at.append(now)
                return bool(ready_at) and rings.agreed_at is not None

            self.wait(f"pods {', '.join(new)} Ready and {len(names)} MNs in one ring", done,
                      info=lambda: f"rings: {rings.describe()}\n{self.describe()}")
        ready, ring = ready_at[0] - sent, rings.agreed_at - sent
        return {"scale_to_ready_s": ready, "scale_to_ring_s": ring, "ring_after_ready_s": ring - ready,
                "members_up": len(rings.members)}

    def scale_down(self, names: list[str], replicas: int) -> dict[str, float]:
        """5 -> 3: seconds from the scale request until the 3 remaining rings hold exactly themselves."""
        stay, leave = names[:replicas], names[replicas:]
        with RingPoller(stay, self.port, self.ips) as rings:
            sent = self.scale(replicas)
            self.wait(f"the {replicas} remaining MNs to hold a ring of {replicas}", lambda: rings.agreed_at,
                      info=lambda: f"rings: {rings.describe()}\n{self.describe()}")
        self.wait(f"pods {', '.join(leave)} to be gone", lambda: not set(leave) & set(self.mn_pods()))
        for name in leave:
            self.ips.pop(name, None)
        return {"scale_down_ring_s": rings.agreed_at - sent, "members_down": len(rings.members)}

    def spec_changes(self, changes: int) -> dict[str, list[float]]:
        """Seconds from each PATCH response until the StatefulSet's watch delivers it: via the operator, and direct."""
        watches = {"operator": TemplateWatch(self.api, self.ns, "idle-mn"),
                   "baseline": TemplateWatch(self.api, self.ns, "baseline")}
        patches = {
            "operator": lambda v: self.merge_patch("ZStackCluster", "idle", {"spec": {"pod": {"annotations": {
                ANNOTATION: v}}}}),
            "baseline": lambda v: self.merge_patch("StatefulSet", "baseline", {"spec": {"template": {"metadata": {
                "annotations": {ANNOTATION: v}}}}}),
        }
        latencies: dict[str, list[float]] = {"operator": [], "baseline": []}
        try:
            for i in range(1, changes + 1):
                for side in ("operator", "baseline"):
                    value = f"{side}-{i}"
                    patches[side](value)
                    sent = time.monotonic()
                    latencies[side].append(watches[side].wait(value) - sent)
                    time.sleep(CHANGE_GAP_S)
                    if self.operator is not None:
                        self.operator.check_alive()
        finally:
            for watch in watches.values():
                watch.stop()
        return latencies


def latency(samples: list[float]) -> dict[str, float | int]:
    return {"p50_s": round(percentile(samples, 50), 4), "p99_s": round(percentile(samples, 99), 4),
            "max_s": round(max(samples), 4), "count": len(samples)}


def run(cluster: Devcluster, broker_url: str, database_url: str, rounds: int = 3, changes: int = 30,
        progress: Say | None = None) -> dict[str, Any]:
    """The benchmark's JSON object; pods must reach `broker_url` and `database_url`."""
    say = progress or (lambda _m: None)
    names = [f"demo-mn-{i}" for i in range(5)]
    with tempfile.TemporaryDirectory(prefix="zstack-bench-k8s-scale-") as tmp:
        bench = Bench(cluster, broker_url, database_url, Path(tmp), say)
        try:
            bench.setup()
            bench.wait_ready()
            say("k8s-scale: demo is Ready with ring 3/3")
            per_round = []
            for n in range(1, rounds + 1):
                up = bench.scale_up(names)
                say(f"k8s-scale round {n}: 3 -> 5: pods Ready after {up['scale_to_ready_s']:.2f}s, ring of 5 after "
                    f"{up['scale_to_ring_s']:.2f}s ({up['ring_after_ready_s']:+.2f}s after Ready)")
                down = bench.scale_down(names, 3)
                say(f"k8s-scale round {n}: 5 -> 3: ring of 3 after {down['scale_down_ring_s']:.2f}s")
                per_round.append({**up, **down})
            say(f"k8s-scale: {changes} spec changes of ZStackCluster idle, and as many of StatefulSet baseline")
            spec = bench.spec_changes(changes)
        except Exception as exc:
            if bench.operator is not None:
                say(f"--- operator log (tail)\n{bench.operator.tail()}")
            if isinstance(exc, ApiError):
                raise BenchError(f"an API request failed: {exc}") from None
            raise
        finally:
            say(f"k8s-scale: cleaning up namespace {bench.ns}")
            bench.teardown()
    return result(per_round, spec, rounds, changes)


def result(per_round: list[dict[str, float]], spec: dict[str, list[float]], rounds: int,
           changes: int) -> dict[str, Any]:
    def over_rounds(key: str) -> dict[str, float]:
        return summary([r[key] for r in per_round], digits=3)

    operator, baseline = latency(spec["operator"]), latency(spec["baseline"])
    scale_up = {key: over_rounds(key) for key in ("scale_to_ready_s", "scale_to_ring_s", "ring_after_ready_s")}
    scale_down = {"scale_down_ring_s": over_rounds("scale_down_ring_s")}
    checks = {
        "ring_after_ready_within_2s": scale_up["ring_after_ready_s"]["worst"] <= RING_AFTER_READY_TARGET_S,
        "scale_down_ring_within_3s_incl_1s_prestop": scale_down["scale_down_ring_s"]["worst"] <= SCALE_DOWN_TARGET_S,
        "spec_to_statefulset_p99_within_1s": operator["p99_s"] <= SPEC_P99_TARGET_S,
    }
    return {
        "benchmark": "k8s-scale",
        "params": {"rounds": rounds, "changes": changes, "replicas": [3, 5], "poll_interval_s": POLL_S},
        "scale_up": {**scale_up, "members": min(r["members_up"] for r in per_round)},
        "scale_down": {**scale_down, "members": max(r["members_down"] for r in per_round)},
        "spec_to_statefulset": {
            "operator": operator, "baseline": baseline,
            "operator_overhead_p50_s": round(operator["p50_s"] - baseline["p50_s"], 4),
            "operator_overhead_p99_s": round(operator["p99_s"] - baseline["p99_s"], 4),
        },
        "rounds": [{k: round(v, 3) for k, v in r.items()} for r in per_round],
        "targets": {"ring_after_ready_s": RING_AFTER_READY_TARGET_S, "scale_down_ring_s": SCALE_DOWN_TARGET_S,
                    "spec_to_statefulset_p99_s": SPEC_P99_TARGET_S},
        "checks": checks,
        "targets_met": all(checks.values()),
    }
