"""The process kubelet against the real control plane: pods run as local processes.

Pods talk back to the test through marker files in tmp_path (same machine, no containers).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.kube import KubeCluster
from zstack_devcluster.kubelet.context import Services, Settings
from zstack_devcluster.kubelet.envvars import expand
from zstack_devcluster.kubelet.ipam import PodIPAM
from zstack_devcluster.kubelet.paths import PodPaths
from zstack_devcluster.kubelet.podnet import bindable
from zstack_devcluster.kubelet.pods import PodWorker
from zstack_devcluster.kubelet.runtime import kill_leftovers
from zstack_devcluster.kubelet.server import KubeletServer, LogNotFound
from zstack_devcluster.kubelet.volumes import VolumeError, link_mounts, setup_volumes

k8s = pytest.mark.k8s


# ---- helpers -------------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.25,
             info: Callable[[], str] | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` (and `info()`) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{info()}" if info else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


class Kube:
    """kubectl in one namespace, JSON in and out."""

    def __init__(self, cluster: KubeCluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns

    def apply(self, *objs: dict[str, Any]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": list(objs)}
        self.cluster.kubectl("-n", self.ns, "apply", "-f", "-", input=json.dumps(doc))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self.cluster.kubectl("-n", self.ns, "get", kind, name, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def pods(self, selector: str = "") -> list[dict[str, Any]]:
        args = ["-n", self.ns, "get", "pods", "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.cluster.kubectl(*args).stdout)["items"]

    def run(self, *args: str) -> str:
        return self.cluster.kubectl("-n", self.ns, *args).stdout

    def describe(self, kind: str, name: str = "") -> str:
        """Diagnostics for failure messages."""
        out = self.cluster.kubectl("-n", self.ns, "get", kind, *([name] if name else []), "-o", "yaml", check=False)
        ev = self.cluster.kubectl("-n", self.ns, "get", "events", "--sort-by=.lastTimestamp", check=False)
        return f"{out.stdout[-4000:]}\n--- events ---\n{ev.stdout[-3000:]}"


@pytest.fixture
def kube(devcluster: KubeCluster) -> Iterator[Kube]:
    """A fresh namespace (with its default ServiceAccount) for one test."""
    ns = f"kl-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", ns)
    wait_for(f"ServiceAccount {ns}/default",
             lambda: devcluster.kubectl("-n", ns, "get", "sa", "default", check=False).returncode == 0, 30)
    try:
        yield Kube(devcluster, ns)
    finally:
        devcluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def pod(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 5, **spec, "containers": list(containers)}}


def py(name: str, script: str, exe: str = "python3", **extra: Any) -> dict[str, Any]:
    """A container running a python3 snippet."""
    return {"name": name, "image": "python:3", "command": [exe, "-c", textwrap.dedent(script)], **extra}


def condition(p: dict[str, Any] | None, ctype: str) -> str:
    for c in ((p or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return c["status"]
    return ""


def proc_alive(pid: int, needle: str) -> bool:
    """Whether pid is a live process whose command line contains needle (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and needle in cmdline


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# ---- pure parts ----------------------------------------------------------------------------------


def test_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("$(MISSING) $(A", env) == "$(MISSING) $(A"
    assert expand("a$b $$ $", env) == "a$b $ $"


def test_loopback_ipam_unique_and_reused(tmp_path: Path) -> None:
    ipam = PodIPAM(lock_dir=tmp_path)
    a, b = ipam.allocate("a"), ipam.allocate("b")
    assert a != b and a.startswith("127.0.") and "127.0.0.1" not in (a, b)
    assert ipam.allocate("a") == a
    ipam.release("a")
    assert ipam.allocate("c") == a
    assert ipam.allocate("d", preferred=b) != b


def test_nested_mount_is_refused_and_host_dir_untouched(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "cfg").mkdir(parents=True)
    (host / "keep.txt").write_text("host data")
    (host / "cfg" / "keep.txt").write_text("host data too")
    paths = PodPaths.for_pod(tmp_path / "root", "ns", "p", "uid")
    paths.create()
    p = {"metadata": {"namespace": "ns", "name": "p", "uid": "uid"},
         "spec": {"automountServiceAccountToken": False,
                  "volumes": [{"name": "host", "hostPath": {"path": str(host)}},
                              {"name": "cfg", "configMap": {"name": "cfg"}}]}}
    c = {"name": "c", "volumeMounts": [{"name": "cfg", "mountPath": "/data/cfg"},
                                       {"name": "host", "mountPath": "/data"}]}
    for _ in range(2):  # the second start removes the first container root again
        with pytest.raises(VolumeError, match=r"'/data/cfg' is nested inside mountPath '/data'"):
            link_mounts(tmp_path / "root", paths, p, c, {})
    assert (host / "keep.txt").read_text() == "host data"
    assert (host / "cfg" / "keep.txt").read_text() == "host data too"
    assert sorted(x.name for x in host.rglob("*")) == ["cfg", "keep.txt", "keep.txt"]


def test_secret_files_are_owner_only(tmp_path: Path) -> None:
    paths = PodPaths.for_pod(tmp_path / "root", "ns", "p", "uid")
    paths.create()
    p = {"metadata": {"namespace": "ns", "name": "p", "uid": "uid"},
         "spec": {"volumes": [{"name": "s", "secret": {"secretName": "s"}},
                              {"name": "m", "secret": {"secretName": "s", "defaultMode": 0o640}},
                              {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
                              {"name": "c", "configMap": {"name": "c"}}]}}
    objs = {"secret": {"data": {"k": "eA=="}}, "configmap": {"data": {"k": "x"}}}
    setup_volumes(tmp_path / "root", paths, p, "127.0.1.1", lambda kind, ns, name: objs[kind], lambda a, e: "tok")

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777
    assert mode(paths.base) == 0o700
    assert (mode(paths.volume("s") / "k"), mode(paths.volume("m") / "k")) == (0o600, 0o640)
    assert (mode(paths.volume("t") / "token"), mode(paths.volume("c") / "k")) == (0o600, 0o644)


class FakeApi:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(body)
        return body


def test_crashed_pod_worker_reports_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    svc = Services(settings=Settings(node_name="n", root=tmp_path, kubeconfig=""), api=api,  # type: ignore[arg-type]
                   cluster=None, ipam=PodIPAM(lock_dir=tmp_path), events=None)  # type: ignore[arg-type]
    p = {"metadata": {"namespace": "ns", "name": "p", "uid": "uid"},
         "spec": {"containers": [{"name": "c", "command": ["true"]}]},
         "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    w = PodWorker(svc, p)

    def boom() -> None:
        raise RuntimeError("boom")
    monkeypatch.setattr(w, "_run", boom)
    w._main()
    st = api.patches[-1]["status"]
    assert st["phase"] == "Failed" and "RuntimeError: boom" in st["message"], st
    assert condition({"status": st}, "Ready") == "False"


def test_silent_client_does_not_block_the_kubelet_endpoint(tmp_path: Path) -> None:
    def resolver(ns: str, pod: str, container: str, previous: bool) -> Any:
        raise LogNotFound("none")
    srv = KubeletServer(tmp_path / "pki", "n", resolver)
    srv.start()
    silent = socket.create_connection(("127.0.0.1", srv.port))  # connects, never starts TLS
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with urllib.request.urlopen(f"https://127.0.0.1:{srv.port}/healthz", timeout=5, context=ctx) as r:
            assert r.read() == b"ok"
    finally:
        stopper = threading.Thread(target=srv.stop, daemon=True)
        stopper.start()
        stopper.join(3)
        silent.close()
    assert not stopper.is_alive(), "the endpoint did not stop while a client stayed silent"


# ---- against the devcluster ----------------------------------------------------------------------

# Kubernetes turns $$ into $ before the shell sees the command, so the shell's $$ is written $$$$.
HTTP_SERVER = 'echo $$$$ > "$MARKS/$POD_NAME.pid"; exec python3 -m http.server 8080 --bind "$POD_IP"'


def web_statefulset(marks: Path, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas, "serviceName": "web", "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "web", "image": "python:3",
                        "command": ["sh", "-c", HTTP_SERVER],
                        "env": [
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "MARKS", "value": str(marks)},
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                    }],
                },
            },
        },
    }


@k8s
def test_statefulset_ready_via_probe_and_scaling_starts_and_stops_processes(kube: Kube, tmp_path: Path) -> None:
    kube.apply(web_statefulset(tmp_path, 2))

    def ready(n: int) -> Callable[[], bool]:
        def check() -> bool:
            sts = kube.get("statefulset", "web") or {}
            pods = kube.pods("app=web")
            return (sts.get("status") or {}).get("readyReplicas") == n and len(pods) == n and all(
                condition(p, "Ready") == "True" for p in pods)
        return check

    wait_for("2 ready replicas", ready(2), 60, info=lambda: kube.describe("pods"))
    pods = {p["metadata"]["name"]: p for p in kube.pods("app=web")}
    ips = {name: p["status"]["podIP"] for name, p in pods.items()}
    assert len(set(ips.values())) == 2 and all(ip.startswith("127.0.") and ip != "127.0.0.1" for ip in ips.values())
    for name, ip in ips.items():
        assert http_ok(f"http://{ip}:8080/"), f"{name} does not serve on its pod IP {ip}"
        pid = int((tmp_path / f"{name}.pid").read_text())
        assert proc_alive(pid, "http.server"), f"no http.server process {pid} for {name}"

    kube.run("scale", "statefulset", "web", "--replicas=3")
    wait_for("3 ready replicas", ready(3), 60, info=lambda: kube.describe("pods"))
    pid2 = int(wait_for("web-2 pid file", lambda: (tmp_path / "web-2.pid").exists() and
                        (tmp_path / "web-2.pid").read_text().strip(), 10))
    assert proc_alive(pid2, "http.server")

    gone = {n: int((tmp_path / f"{n}.pid").read_text()) for n in ("web-1", "web-2")}
    kube.run("scale", "statefulset", "web", "--replicas=1")
    wait_for("web-1 and web-2 deleted", lambda: {p["metadata"]["name"] for p in kube.pods("app=web")} == {"web-0"},
             60, info=lambda: kube.describe("pods"))
    wait_for("their processes gone", lambda: not any(proc_alive(p, "http.server") for p in gone.values()), 10)
    assert proc_alive(int((tmp_path / "web-0.pid").read_text()), "http.server"), "web-0 must keep running"


PRESTOP_SERVER = """
    import http.server, os, signal, sys, time
    marks = os.environ["MARKS"]
    def mark(name):
        with open(os.path.join(marks, name), "w") as f:
            f.write(repr(time.time()))
    def on_term(*_):
        mark("sigterm-" + os.environ["WHO"])
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/prestop":
                mark("prestop-http")
            self.send_response(200)
            self.end_headers()
        def log_message(self, *a):
            pass
    mark("started-" + os.environ["WHO"])
    http.server.HTTPServer((os.environ["POD_IP"], int(os.environ["PORT"])), H).serve_forever()
"""


@k8s
def test_delete_runs_prestop_then_sigterm(kube: Kube, tmp_path: Path) -> None:
    def env(who: str, port: int) -> list[dict[str, Any]]:
        return [{"name": "MARKS", "value": str(tmp_path)}, {"name": "WHO", "value": who},
                {"name": "PORT", "value": str(port)},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]

    exec_hook = {"exec": {"command": ["sh", "-c", 'python3 -c "import time; print(repr(time.time()))" '
                                                  '> "$MARKS/prestop-exec"']}}
    kube.apply(pod(
        "graceful",
        py("a", PRESTOP_SERVER, env=env("a", 8081), lifecycle={"preStop": exec_hook}),
        py("b", PRESTOP_SERVER, env=env("b", 8082),
           lifecycle={"preStop": {"httpGet": {"path": "/prestop", "port": 8082}}}),
        terminationGracePeriodSeconds=20,
    ))
    wait_for("both containers started", lambda: all((tmp_path / f"started-{w}").exists() for w in "ab"), 30,
             info=lambda: kube.describe("pod", "graceful"))
    kube.run("delete", "pod", "graceful", "--wait=false")
    wait_for("pod object removed", lambda: kube.get("pod", "graceful") is None, 30)
    marks = {p.name: float(p.read_text()) for p in tmp_path.iterdir() if not p.name.startswith("started")}
    assert set(marks) == {"prestop-exec", "prestop-http", "sigterm-a", "sigterm-b"}, marks
    assert marks["prestop-exec"] <= marks["sigterm-a"], marks
    assert marks["prestop-http"] <= marks["sigterm-b"], marks


RBAC_CLIENT = """
    import os, sys
    from kubernetes import client, config
    try:
        config.load_incluster_config()
        how = "incluster"
    except config.ConfigException:
        config.load_kube_config()
        how = "kubeconfig"
    ns = open(os.path.join(os.environ["POD_ROOT"], "var/run/secrets/kubernetes.io/serviceaccount/namespace")).read()
    try:
        client.CoreV1Api().list_namespaced_pod(ns)
        result = "ok"
    except client.ApiException as e:
        result = str(e.status)
    with open(os.path.join(os.environ["MARKS"], os.environ["POD_NAME"]), "w") as f:
        f.write(how + " " + result)
"""


@k8s
def test_serviceaccount_rbac_is_enforced(kube: Kube, tmp_path: Path) -> None:
    ns = kube.ns
    kube.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]},
    )
    env = [{"name": "MARKS", "value": str(tmp_path)},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    for sa in ("reader", "nobody"):
        # sys.executable: the interpreter running pytest has the kubernetes client installed
        kube.apply(pod(sa, py("c", RBAC_CLIENT, exe=sys.executable, env=env), serviceAccountName=sa,
                       restartPolicy="Never"))
    for sa in ("reader", "nobody"):
        wait_for(f"pod {sa} to finish", lambda sa=sa: (tmp_path / sa).exists()
                 and ((kube.get("pod", sa) or {}).get("status") or {}).get("phase") == "Succeeded",
                 60, info=lambda sa=sa: kube.describe("pod", sa))
    assert (tmp_path / "reader").read_text() == "kubeconfig ok"
    assert (tmp_path / "nobody").read_text() == "kubeconfig 403"


@k8s
def test_unrunnable_commands_are_never_running(kube: Kube) -> None:
    kube.apply(
        pod("missing", {"name": "c", "image": "busybox", "command": ["no-such-command-anywhere", "x"]}),
        pod("imageonly", {"name": "c", "image": "nginx"}),
    )

    def waiting_reason(name: str) -> str:
        st = ((kube.get("pod", name) or {}).get("status") or {}).get("containerStatuses") or [{}]
        return ((st[0].get("state") or {}).get("waiting") or {}).get("reason", "")

    wait_for("CommandNotFound", lambda: waiting_reason("missing") == "CommandNotFound", 30,
             info=lambda: kube.describe("pod", "missing"))
    wait_for("NoCommand", lambda: waiting_reason("imageonly") == "NoCommand", 30,
             info=lambda: kube.describe("pod", "imageonly"))
    for name in ("missing", "imageonly"):
        p = kube.get("pod", name) or {}
        assert p["status"]["phase"] == "Pending", p["status"]
        assert condition(p, "Ready") == "False"
        assert not p["status"]["containerStatuses"][0]["started"]


@k8s
def test_liveness_failure_restarts_container(kube: Kube, tmp_path: Path) -> None:
    kube.apply(pod("flaky", {
        "name": "web", "image": "python:3",
        "command": ["sh", "-c", 'echo $$$$ >> "$MARKS/pids"; exec python3 -m http.server 8080 --bind "$POD_IP"'],
        "env": [{"name": "MARKS", "value": str(tmp_path)},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        # http.server answers 404 for a path that does not exist: the liveness probe fails.
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2},
    }, terminationGracePeriodSeconds=2))

    def restarted() -> bool:
        st = ((kube.get("pod", "flaky") or {}).get("status") or {}).get("containerStatuses") or [{}]
        return st[0].get("restartCount", 0) >= 1 and "terminated" in (st[0].get("lastState") or {})

    wait_for("restartCount >= 1", restarted, 40, info=lambda: kube.describe("pod", "flaky"))
    pids = [int(x) for x in wait_for("two runs", lambda: len((tmp_path / "pids").read_text().split()) >= 2 and
                                     (tmp_path / "pids").read_text().split(), 20)]
    assert pids[0] != pids[1] and not proc_alive(pids[0], "http.server")


@k8s
def test_crashing_container_backs_off(kube: Kube) -> None:
    kube.apply(pod("crashy", {"name": "c", "image": "x", "command": ["sh", "-c", "echo bye; exit 3"]}))

    def backing_off() -> bool:
        st = ((kube.get("pod", "crashy") or {}).get("status") or {}).get("containerStatuses") or [{}]
        waiting = (st[0].get("state") or {}).get("waiting") or {}
        last = (st[0].get("lastState") or {}).get("terminated") or {}
        return waiting.get("reason") == "CrashLoopBackOff" and last.get("exitCode") == 3

    wait_for("CrashLoopBackOff with exit code 3", backing_off, 40, info=lambda: kube.describe("pod", "crashy"))
    assert (kube.get("pod", "crashy") or {})["status"]["phase"] == "Running"  # restarting, like the real kubelet
    # kubectl logs goes through the API server to the kubelet's endpoint; kubelet lines are not shown.
    # A restart may fall between two calls (a new run has not printed yet): retry for a bounded time.
    def logs(*extra: str) -> str:
        return kube.cluster.kubectl("-n", kube.ns, "logs", "crashy", *extra, check=False).stdout
    wait_for("kubectl logs [--previous] to show bye", lambda: logs() == "bye\n" and logs("--previous") == "bye\n",
             30, info=lambda: f"logs: {logs()!r}\nprevious: {logs('--previous')!r}")


@k8s
def test_kubectl_logs_and_follow(kube: Kube) -> None:
    kube.apply(pod("talker", {"name": "c", "image": "x", "command": [
        "sh", "-c", "echo one; echo two; sleep 3; echo three"]}, restartPolicy="Never"))
    # startswith: on a slow machine the container may already have printed "three"
    wait_for("the first lines", lambda: kube.cluster.kubectl("-n", kube.ns, "logs", "talker", check=False).stdout
             .startswith("one\ntwo\n"), 30, info=lambda: kube.describe("pod", "talker"))
    # -f streams until the container exits
    assert kube.cluster.kubectl("-n", kube.ns, "logs", "-f", "talker", timeout=30).stdout == "one\ntwo\nthree\n"
    assert kube.run("logs", "talker", "--tail=1") == "three\n"


ENV_DUMP = """
    import json, os
    root = os.environ["POD_ROOT"]
    def read(rel):
        with open(os.path.join(root, rel)) as f:
            return f.read()
    out = {k: v for k, v in os.environ.items() if k.startswith(("F_", "CM_", "S_", "X_", "POD_ROOT", "KUBE"))}
    out["files"] = {rel: read(rel) for rel in ("etc/cfg/greeting", "etc/secret/password",
                                               "etc/info/labels", "etc/info/name", "etc/one/g.txt")}
    out["init"] = read("work/from-init")
    with open(os.path.join(os.environ["MARKS"], "env.json"), "w") as f:
        json.dump(out, f)
"""


@k8s
def test_env_volumes_and_init_containers(kube: Kube, tmp_path: Path) -> None:
    field = {f"F_{k.upper().replace('.', '_')}": k for k in (
        "metadata.name", "metadata.namespace", "metadata.uid", "status.podIP", "spec.nodeName",
        "spec.serviceAccountName")}
    env = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in field.items()]
    env += [
        {"name": "MARKS", "value": str(tmp_path)},
        {"name": "S_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "CM_ONE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "X_EXPANDED", "value": "$(CM_ONE)-$(F_METADATA_NAME)-$$(CM_ONE)"},
    ]
    mounts = [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "sec", "mountPath": "/etc/secret"},
              {"name": "info", "mountPath": "/etc/info"}, {"name": "work", "mountPath": "/work"},
              {"name": "cfg", "mountPath": "/etc/one/g.txt", "subPath": "greeting"}]
    init = {"name": "init", "image": "x", "command": ["sh", "-c", 'echo -n done > "$POD_ROOT/work/from-init"'],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}]}
    kube.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"password": "s3cret"}},
        pod("envy", py("c", ENV_DUMP, env=env, volumeMounts=mounts,
                       envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}]),
            initContainers=[init], restartPolicy="Never",
            volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "sec", "secret": {"secretName": "sec"}},
                     {"name": "work", "emptyDir": {}},
                     {"name": "info", "downwardAPI": {"items": [
                         {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                         {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}]),
    )
    wait_for("pod Succeeded", lambda: ((kube.get("pod", "envy") or {}).get("status") or {}).get("phase")
             == "Succeeded", 60, info=lambda: kube.describe("pod", "envy"))
    p = kube.get("pod", "envy") or {}
    got = json.loads((tmp_path / "env.json").read_text())
    assert got["F_METADATA_NAME"] == "envy" and got["F_METADATA_NAMESPACE"] == kube.ns
    assert got["F_METADATA_UID"] == p["metadata"]["uid"]
    assert got["F_STATUS_PODIP"] == p["status"]["podIP"]
    assert got["F_SPEC_NODENAME"] == p["spec"]["nodeName"] and got["F_SPEC_SERVICEACCOUNTNAME"] == "default"
    assert got["S_PASSWORD"] == "s3cret" and got["CM_ONE"] == "hello" and got["CM_greeting"] == "hello"
    assert got["X_EXPANDED"] == "hello-envy-$(CM_ONE)"
    assert "KUBERNETES_SERVICE_HOST" not in got and got["KUBECONFIG"].endswith("/kubeconfig")
    assert got["files"] == {"etc/cfg/greeting": "hello", "etc/secret/password": "s3cret",
                            "etc/info/labels": "", "etc/info/name": "envy", "etc/one/g.txt": "hello"}
    assert got["init"] == "done"
    assert p["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


class SecondKubelet:
    """Another process kubelet (own Node, tainted so only tolerating pods land there) on the same cluster."""

    TAINT = "devcluster.test/second-kubelet"

    def __init__(self, kube: Kube, root: Path, *extra: str) -> None:
        self.kube, self.root, self.extra = kube, root, extra
        self.node = f"second-{uuid.uuid4().hex[:6]}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return (self.root / "kubelet.log").read_text(errors="replace")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "kubelet.log", "a") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zstack_devcluster.kubelet", "--kubeconfig", str(self.kube.cluster.kubeconfig),
                 "--root", str(self.root / "kubelet"), "--node-name", self.node,
                 "--register-with-taints", f"{self.TAINT}=true:NoSchedule", *self.extra],
                stdout=logf, stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            out = self.kube.cluster.kubectl("get", "node", self.node, "-o", "json", check=False)
            return out.returncode == 0 and condition(json.loads(out.stdout), "Ready") == "True"
        wait_for(f"Node {self.node} Ready", ready, 30, info=lambda: self.log)

    def stop(self, timeout: float = 20) -> float:
        """SIGTERM the kubelet; return how long it took to exit."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"kubelet did not exit within {timeout}s of SIGTERM:\n{self.log}") from None
        return time.monotonic() - t0

    def pod(self, name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
        """A pod that lands on this kubelet's Node."""
        return pod(name, *containers, nodeSelector={"kubernetes.io/hostname": self.node},
                   tolerations=[{"key": self.TAINT, "operator": "Exists"}], **spec)

    def cleanup(self) -> None:
        """Stop the kubelet (it stops its pods), then kill whatever its pods left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_leftovers(self.root / "kubelet")
        self.kube.cluster.kubectl("delete", "node", self.node, "--wait=false", check=False)
        self.kube.cluster.kubectl("-n", "kube-node-lease", "delete", "lease", self.node, "--wait=false", check=False)


@pytest.fixture
def second_kubelet(kube: Kube, tmp_path: Path) -> Iterator[Callable[..., SecondKubelet]]:
    made: list[SecondKubelet] = []

    def make(*extra: str) -> SecondKubelet:
        k = SecondKubelet(kube, tmp_path / f"kubelet-{len(made)}", *extra)
        made.append(k)
        k.start()
        return k

    yield make
    for k in made:
        k.cleanup()


@k8s
def test_kubelet_shutdown_stops_pods_and_restart_resumes_them(
    kube: Kube, tmp_path: Path, second_kubelet: Callable[..., SecondKubelet]
) -> None:
    kl = second_kubelet()
    script = """
        import os, signal, sys, time
        marks = os.environ["MARKS"]
        def on_term(*_):
            open(os.path.join(marks, "sigterm"), "a").write("x")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open(os.path.join(marks, "pids"), "a").write(f"{os.getpid()}\\n")
        while True:
            time.sleep(0.2)
    """
    kube.apply(kl.pod("sleeper", py("c", script, env=[{"name": "MARKS", "value": str(tmp_path)}])))
    pids = tmp_path / "pids"
    wait_for("the container to start", pids.exists, 30, info=lambda: kube.describe("pod", "sleeper"))
    first = kube.get("pod", "sleeper") or {}
    pid = int(pids.read_text().split()[0])

    took = kl.stop()
    assert (tmp_path / "sigterm").exists(), "the kubelet's SIGTERM did not reach the container"
    assert not proc_alive(pid, "python"), f"container process {pid} outlived its kubelet"
    assert took < 12, f"kubelet took {took:.1f}s to stop"

    kl.start()  # same root and node name: the pod is resumed, counted as a restart, with the same IP

    def restarted() -> bool:
        st = ((kube.get("pod", "sleeper") or {}).get("status") or {}).get("containerStatuses") or [{}]
        return st[0].get("restartCount") == 1 and "running" in (st[0].get("state") or {})
    wait_for("the pod to run again", restarted, 30, info=lambda: kube.describe("pod", "sleeper") + kl.log)
    # "running" is reported once the process is spawned; its script writes its pid a moment later.
    wait_for("the restarted container to write its pid", lambda: len(pids.read_text().split()) >= 2, 30,
             info=lambda: pids.read_text())
    assert len(pids.read_text().split()) == 2
    assert (kube.get("pod", "sleeper") or {})["status"]["podIP"] == first["status"]["podIP"]
    kube.run("delete", "pod", "sleeper", "--wait=true", "--timeout=30s")
    assert not proc_alive(int(pids.read_text().split()[1]), "python")


POD_CIDR = "198.18.0.0/24"  # RFC 2544 benchmarking range: not something this machine otherwise reaches


@k8s
def test_second_kubelet_with_pod_cidr_fills_endpointslices(
    kube: Kube, tmp_path: Path, second_kubelet: Callable[..., SecondKubelet], request: pytest.FixtureRequest
) -> None:
    """Opt-in --pod-cidr: non-loopback pod IPs, which the API server accepts in EndpointSlices.

    Runs a second process kubelet (its own tainted Node) against the same control plane. It routes
    POD_CIDR to the loopback device (a route in the kernel's local table), so it needs root; the test
    removes the route again if it was not there before.
    """
    if os.geteuid() != 0:
        pytest.skip("--pod-cidr routes a range to the loopback device, which needs root (CAP_NET_ADMIN)")
    probe = str(ipaddress.IPv4Network(POD_CIDR).network_address + 1)
    if not bindable(probe):
        request.addfinalizer(lambda: subprocess.run(
            ["ip", "route", "del", "local", POD_CIDR, "dev", "lo", "table", "local"], check=False))
    kl = second_kubelet("--pod-cidr", POD_CIDR)
    web = {"name": "web", "image": "python:3",
           "command": ["python3", "-m", "http.server", "8080", "--bind", "$(POD_IP)"],
           "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
           "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}
    p = kl.pod("pn", web)
    p["metadata"]["labels"] = {"app": "pn"}
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "pn"},
                "spec": {"selector": {"app": "pn"}, "ports": [{"port": 80, "targetPort": 8080}]}}, p)
    wait_for("pod pn Ready", lambda: condition(kube.get("pod", "pn"), "Ready") == "True", 60,
             info=lambda: kube.describe("pod", "pn") + kl.log)
    ip = (kube.get("pod", "pn") or {})["status"]["podIP"]
    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(POD_CIDR)
    assert http_ok(f"http://{ip}:8080/")

    def slice_ips() -> set[str]:
        out = json.loads(kube.run("get", "endpointslices", "-l", "kubernetes.io/service-name=pn", "-o", "json"))
        return {a for s in out["items"] for e in s.get("endpoints") or []
                if (e.get("conditions") or {}).get("ready") for a in e["addresses"]}
    wait_for("the EndpointSlice to list the pod IP", lambda: slice_ips() == {ip}, 30,
             info=lambda: kube.describe("endpointslices"))
    kube.run("delete", "pod", "pn", "--wait=true", "--timeout=30s")
