"""`zstack-dev demo`: the operator, installed with Helm on the devcluster, running a ZStackCluster of MN pods
against a private RabbitMQ and PostgreSQL.

`demo up` (idempotent):
1. a supervisor process runs the servers in `<dir>/demo/` (one SIGTERM stops them all): RabbitMQ, PostgreSQL
   and a Prometheus that scrapes the MN and operator pods (for the dashboards' queries);
2. helm installs charts/zstack-operator (release zstack-operator in zstack-system); the process kubelet
   runs the operator pod;
3. the servers' URLs go into two Secrets (through stdin, never argv) and
   examples/zstackcluster-devcluster.yaml is applied;
4. it waits until `kubectl get zsc` shows every MN in one ring, and prints what to try next.

`demo down` undoes it in reverse: the ZStackCluster first (its MNs leave the ring while the broker and
database still run), then the Helm release, then the servers. The CRD stays, as with `helm uninstall`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from zstack_devcluster import controlplane, procs, tools
from zstack_devcluster.layout import Layout
from zstack_devcluster.progress import Say, Ticker, stderr_say
from zstack_devcluster.services import PostgreSQL, Prometheus, RabbitMQ
from zstack_devcluster.state import ProcRecord

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "zstack-operator"
EXAMPLE = REPO / "examples" / "zstackcluster-devcluster.yaml"
RELEASE = "zstack-operator"
OPERATOR_NS = "zstack-system"
NAMESPACE = "default"
CLUSTER = "demo"
MN_SELECTOR = f"app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/component=mn"
OPERATOR_SELECTOR = f"app.kubernetes.io/name=zstack-operator,app.kubernetes.io/instance={RELEASE}"
URL_SECRETS = {"broker": "demo-external-broker", "database": "demo-external-database"}


class DemoError(RuntimeError):
    """The demo could not start; the message says where to look."""


@dataclass(frozen=True)
class Kube:
    """kubectl and helm (the pinned binaries) against the devcluster's admin kubeconfig."""

    kubeconfig: Path

    def run(self, tool: str, *args: str, input: str | None = None, timeout: float = 300, check: bool = True) -> str:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        proc = subprocess.run([str(tools.tool_path(tool)), *args], input=input, capture_output=True, text=True,
                              env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise DemoError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def kubectl(self, *args: str, **kwargs: Any) -> str:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> str:
        return self.run("helm", *args, **kwargs)

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o json`, parsed; None when kubectl fails (not found, API server busy)."""
        out = self.kubectl("get", *args, "-o", "json", check=False)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError:
            return None


# ---- the servers' supervisor -------------------------------------------------------------------------


def _paths(root: Path) -> tuple[Path, Path, Path]:
    demo = root / "demo"
    return demo / "supervisor.json", demo / "servers.json", Layout(root).log("demo")


def _supervisor(record_file: Path) -> ProcRecord | None:
    """The running supervisor, identified by pid and kernel start time (a reused pid never matches)."""
    try:
        record = ProcRecord(**json.loads(record_file.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return record if procs.record_alive(record) else None


def servers_running(root: Path) -> bool:
    """Whether the demo's servers (its supervisor) run in this devcluster directory."""
    return _supervisor(_paths(root)[0]) is not None


def start_servers(root: Path, say: Say = stderr_say, timeout: float = 180.0) -> dict[str, str]:
    """Start the supervisor unless it runs; return the servers' URLs (with passwords: keep them off argv)."""
    record_file, servers_file, log_file = _paths(root)
    record = _supervisor(record_file)
    if record is None:
        servers_file.unlink(missing_ok=True)
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record = procs.spawn([sys.executable, "-m", "zstack_devcluster.demo", str(root)], log_file,
                             cwd=record_file.parent)
        record_file.write_text(json.dumps(asdict(record)))
    ticker = Ticker(say)
    while not servers_file.exists():
        if not procs.record_alive(record):
            raise DemoError(f"the demo's servers did not start; see {log_file}:\n"
                            + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:]))
        if ticker.elapsed() > timeout:
            raise DemoError(f"the demo's servers were not ready within {timeout:.0f}s; see {log_file}")
        ticker.tick(f"RabbitMQ, PostgreSQL and Prometheus (log {log_file})")
        time.sleep(0.2)
    if ticker.elapsed() > 1:
        ticker.done(f"RabbitMQ, PostgreSQL and Prometheus ready in {ticker.elapsed():.1f}s")
    return json.loads(servers_file.read_text())


def stop_servers(root: Path, grace: float = 150.0) -> bool:
    """Stop the supervisor and its servers. False when it was not running. The grace period covers the
    supervisor stopping its three servers one after another (each may take up to 30 s, then is killed)."""
    record_file, servers_file, _ = _paths(root)
    record = _supervisor(record_file)
    if record is not None:
        procs.stop_groups([(record.pid, record.start_time)], grace)
    record_file.unlink(missing_ok=True)
    servers_file.unlink(missing_ok=True)
    return record is not None


def supervise(root: Path) -> None:
    """Run the servers until SIGTERM; publish their URLs in a file only its owner can read."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    demo_dir = root / "demo"
    with RabbitMQ(demo_dir / "rabbitmq", say=stderr_say) as broker, \
            PostgreSQL(demo_dir / "postgres", say=stderr_say) as database, \
            Prometheus(demo_dir / "prometheus", kubeconfig=Layout(root).kubeconfig, scrape_interval="5s",
                       say=stderr_say) as prometheus:
        servers = {"broker": broker.url, "database": database.url, "prometheus": prometheus.url,
                   "broker_display": broker.display_url, "database_display": database.display_url}
        servers_file = _paths(root)[1]
        tmp = servers_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(servers, out)
        tmp.rename(servers_file)  # atomic: a reader never sees half a file
        stderr_say("RabbitMQ, PostgreSQL and Prometheus running until SIGTERM")
        while not stop.wait(1.0):
            pass


# ---- up and down ---------------------------------------------------------------------------------------


def up(root: Path, replicas: int = 3, timeout: float = 300.0, say: Say = stderr_say) -> dict[str, Any]:
    """Bring the demo up (or check that it is); return what `print_next_steps` shows."""
    if not controlplane.is_up(root):
        raise DemoError(f"the devcluster in {root} is not running: start it with `zstack-dev up` first")
    for path in (CHART, EXAMPLE):
        if not path.exists():
            raise DemoError(f"{path} is missing: run the demo from a source checkout of the project")
    kube = Kube(Layout(root).kubeconfig)
    started = time.monotonic()
    existed = _running_parts(root, kube)
    try:
        servers = start_servers(root, say)
        say(f"installing the operator with Helm (release {RELEASE} in namespace {OPERATOR_NS})")
        # The process kubelet runs pods in the host's network: the operator listens on its own pod IP only.
        kube.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--create-namespace",
                  "--set-string", "metrics.bindAddress=$(POD_IP)", "--wait", "--timeout", "3m")
        say(f"applying ZStackCluster {NAMESPACE}/{CLUSTER} with {replicas} MNs ({EXAMPLE.relative_to(REPO)})")
        kube.kubectl("apply", "-f", "-", input=_url_secrets(servers))
        kube.kubectl("apply", "-f", "-", input=_cluster_manifest(replicas))
        cr = _wait_ring(kube, replicas, timeout, say)
    except BaseException as err:
        diagnosis = _diagnose(kube)
        if existed:  # an earlier, working demo stays as it was
            diagnosis += (f"\nthe demo that was running ({', '.join(existed)}) is left as it is; "
                          "`make demo-down` removes it")
        else:  # an interrupted or failed first start leaves nothing running
            down(root, say=lambda _msg: None)
        if isinstance(err, DemoError):
            raise DemoError(f"{err}\n{diagnosis}") from None
        raise
    say(f"demo ready in {time.monotonic() - started:.1f}s")
    return _summary(kube, root, cr, servers)


def down(root: Path, say: Say = stderr_say) -> bool:
    """Delete the ZStackCluster (MNs leave gracefully), uninstall the operator, stop the servers.
    False when nothing was running."""
    ran = False
    if controlplane.is_up(root):
        kube = Kube(Layout(root).kubeconfig)
        if kube.get("zsc", CLUSTER, "-n", NAMESPACE) is not None:
            ran = True
            say(f"deleting ZStackCluster {NAMESPACE}/{CLUSTER}; its MNs leave the ring")
            kube.kubectl("-n", NAMESPACE, "delete", "zsc", CLUSTER, "--wait=true", "--timeout=60s", check=False)
            kube.kubectl("-n", NAMESPACE, "wait", "--for=delete", "pod", "-l", MN_SELECTOR, "--timeout=90s",
                         check=False)
        if kube.helm("status", RELEASE, "--namespace", OPERATOR_NS, check=False):
            ran = True
            say(f"uninstalling the Helm release {RELEASE} (the ZStackCluster CRD stays)")
            kube.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait", "--timeout", "2m", check=False)
        kube.kubectl("-n", NAMESPACE, "delete", "secret", *URL_SECRETS.values(), "--ignore-not-found", check=False)
    if stop_servers(root):
        ran = True
        say("RabbitMQ, PostgreSQL and Prometheus stopped")
    return ran


def _running_parts(root: Path, kube: Kube) -> list[str]:
    """What of the demo runs already (empty on a first start)."""
    parts = []
    if servers_running(root):
        parts.append("servers")
    if kube.helm("status", RELEASE, "--namespace", OPERATOR_NS, check=False):
        parts.append(f"Helm release {RELEASE}")
    if kube.get("zsc", CLUSTER, "-n", NAMESPACE) is not None:
        parts.append(f"ZStackCluster {CLUSTER}")
    return parts


def _url_secrets(servers: dict[str, str]) -> str:
    docs = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "zstack-demo"}},
             "stringData": {"url": servers[backend]}} for backend, name in URL_SECRETS.items()]
    return yaml.safe_dump_all(docs)


def _cluster_manifest(replicas: int) -> str:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = NAMESPACE
    manifest["spec"]["replicas"] = replicas
    return json.dumps(manifest)


def _wait_ring(kube: Kube, replicas: int, timeout: float, say: Say) -> dict[str, Any]:
    """Poll the ZStackCluster until it is Ready with every MN in one ring; return it."""
    ticker = Ticker(say)
    want = f"{replicas}/{replicas}"
    while True:
        cr = kube.get("zsc", CLUSTER, "-n", NAMESPACE) or {}
        status = cr.get("status") or {}
        ring = (status.get("ring") or {}).get("summary", "-")
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        if ring == want and ready.get("status") == "True":
            ticker.done(f"ZStackCluster {CLUSTER}: ring {ring}, Ready ({ticker.elapsed():.1f}s)")
            return cr
        if ticker.elapsed() > timeout:
            raise DemoError(f"ZStackCluster {CLUSTER} was not Ready with ring {want} within {timeout:.0f}s "
                            f"(ring {ring}, Ready: {ready.get('reason', '-')}: {ready.get('message', '')})")
        ticker.tick(f"ZStackCluster {CLUSTER}: ring {ring}, {ready.get('reason') or 'no status yet'}")
        time.sleep(1.0)


def _diagnose(kube: Kube) -> str:
    """What a failed start looked like, for the error message."""
    parts = []
    for args in (("get", "zsc,pods", "-A", "-o", "wide"),
                 ("-n", OPERATOR_NS, "logs", "-l", OPERATOR_SELECTOR, "--tail=20")):
        out = kube.kubectl(*args, check=False, timeout=30)
        if out.strip():
            parts.append(f"$ kubectl {' '.join(args)}\n{out.rstrip()}")
    return "\n".join(parts)


def _summary(kube: Kube, root: Path, cr: dict[str, Any], servers: dict[str, str]) -> dict[str, Any]:
    pods = (kube.get("pods", "-n", NAMESPACE, "-l", MN_SELECTOR) or {}).get("items", [])
    operators = (kube.get("pods", "-n", OPERATOR_NS, "-l", OPERATOR_SELECTOR) or {}).get("items", [])
    members = {m.get("pod"): m.get("uuid") for m in cr["status"]["ring"].get("members", [])}
    api = cr["spec"].get("api", {})
    port = api.get("port", 8080)
    scheme = "http" if (api.get("tls") or {}).get("enabled") is False else "https"
    ca_file = ""
    if scheme == "https":  # the cluster's public CA, for zstack-cli --ca-file and curl --cacert
        ca = (kube.get("configmap", f"{CLUSTER}-api-ca", "-n", NAMESPACE) or {}).get("data", {}).get("ca.crt", "")
        ca_path = root / "demo-api-ca.crt"
        ca_path.write_text(ca)
        ca_file = str(ca_path)
    return {
        "ca_file": ca_file, "api_server_name": f"{CLUSTER}-api.{NAMESPACE}.svc", "api_port": port,
        "cluster": CLUSTER, "namespace": NAMESPACE, "ring": cr["status"]["ring"]["summary"],
        "mns": sorted(({"pod": p["metadata"]["name"], "ip": p["status"].get("podIP"),
                        "uuid": members.get(p["metadata"]["name"]), "url": f"{scheme}://{p['status'].get('podIP')}:{port}"}
                       for p in pods), key=lambda mn: mn["pod"]),
        "operator": [{"pod": p["metadata"]["name"], "ip": p["status"].get("podIP")} for p in operators],
        "broker": servers["broker_display"], "database": servers["database_display"],
        "prometheus": servers["prometheus"],
        "kubeconfig": str(Layout(root).kubeconfig),
        "get_zsc": kube.kubectl("get", "zsc", "-n", NAMESPACE, check=False).rstrip(),
    }


def print_next_steps(ready: dict[str, Any], dir_arg: str = "") -> None:
    """What runs, and what to try next."""
    echo = click.echo
    echo(f"\n$ kubectl get zsc\n{ready['get_zsc']}\n")
    echo(f"The operator (Helm release {RELEASE}, namespace {OPERATOR_NS}) runs {len(ready['mns'])} management nodes:")
    for mn in ready["mns"]:
        echo(f"  {mn['pod']}  {mn['uuid']}  {mn['url']}")
    echo(f"broker {ready['broker']}\ndatabase {ready['database']}\nprometheus {ready['prometheus']}")
    first = ready["mns"][0]
    operator_ip = ready["operator"][0]["ip"] if ready["operator"] else "<operator pod IP>"
    echo("\nTry next:")
    token = f"kubectl get secret {CLUSTER}-api-token -o jsonpath='{{.data.token}}' | base64 -d"
    echo(f"  eval \"$(zstack-dev env{dir_arg})\"   # kubectl and helm on PATH, KUBECONFIG set")
    echo("  kubectl get zsc,pods,leases -o wide     # one Lease per MN, held by its UUID")
    echo(f"  kubectl scale zsc/{CLUSTER} --replicas=5 && kubectl get zsc -w   # RING goes 3/5 ... 5/5")
    echo(f"  kubectl delete pod {CLUSTER}-mn-1       # it returns with a new UUID; the ring converges")
    curl = "curl -s"
    echo(f"  export ZSTACK_API_URL={first['url']}")
    if ready["ca_file"]:  # HTTPS: verify with the cluster's CA; pod IPs are in no certificate, the Service's name is
        echo(f"  export ZSTACK_CA_FILE={ready['ca_file']} ZSTACK_TLS_SERVER_NAME={ready['api_server_name']}")
        curl += f" --cacert {ready['ca_file']} --connect-to {ready['api_server_name']}:{ready['api_port']}:" \
                f"{first['ip']}:{ready['api_port']}"
        metrics_url = f"https://{ready['api_server_name']}:{ready['api_port']}/metrics"
    else:
        metrics_url = f"{first['url']}/metrics"
    echo(f"  export ZSTACK_API_TOKEN=$({token})")
    echo("  zstack-cli hosts add host-1 --cpu 64 --memory 262144")
    echo("  zstack-cli vms create vm-1 --cpu 2 --memory 2048 && zstack-cli vms list")
    echo(f"  {curl} {metrics_url} | grep ^zstack_bus_      # an MN's metrics (every MN pod IP)")
    echo(f"  curl -s http://{operator_ip}:8081/metrics | grep ^zstack_operator_   # the operator's")
    echo(f"  open {ready['prometheus']}/graph and try: sum by (service) (rate(zstack_bus_messages_received_total[1m]))")
    echo(f"  Grafana: add {ready['prometheus']} as a Prometheus data source, import dashboards/*.json")
    echo("  make demo-down                              # stop it all")


if __name__ == "__main__":
    supervise(Path(sys.argv[1]))
