"""`zstack-dev demo`: the user's path on the devcluster's container node, with our own images.

`demo up` (idempotent; needs `zstack-dev images` and `zstack-dev up --node containers` first):
1. the project's images (`zstack-dev images`) are imported into the node's containerd, never pulled;
2. a supervisor process runs a Prometheus on the host (one SIGTERM stops it) that scrapes the MN and
   operator pods through the node's routed pod network, for the dashboards' queries;
3. this checkout's CRD is applied (Helm never upgrades one), then helm installs charts/zstack-operator with
   the locally built operator image (release zstack-operator in
   zstack-system); both namespaces enforce Pod Security "restricted";
4. examples/zstackcluster.yaml is applied with our images: 3 MNs, and RabbitMQ and PostgreSQL run by the
   operator (managed mode), in containers;
5. it waits until `kubectl get zsc` shows every MN in one ring, and prints what it did and what to try next.

`demo down` undoes it in reverse: the ZStackCluster first (its MNs leave the ring while the broker and
database still run; its volume claims go with it), then the Helm release, then Prometheus. The volumes
are recycled for the next cloud. The CRD stays, as with `helm uninstall`.
"""

from __future__ import annotations

import ipaddress
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

from zstack_devcluster import controlplane, procs, state, tools
from zstack_devcluster import images as builds
from zstack_devcluster.containernode import images as node_images
from zstack_devcluster.containernode.config import NodeFiles
from zstack_devcluster.containernode.network import NodeNetwork
from zstack_devcluster.containernode.node import recycle_volumes
from zstack_devcluster.layout import Layout
from zstack_devcluster.pki import SERVICE_CIDR
from zstack_devcluster.progress import Say, Ticker, stderr_say
from zstack_devcluster.services import Prometheus
from zstack_devcluster.state import ProcRecord

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "zstack-operator"
CRD = REPO / "crds" / "zstackcluster.yaml"
EXAMPLE = REPO / "examples" / "zstackcluster.yaml"
RELEASE = "zstack-operator"
OPERATOR_NS = "zstack-system"
NAMESPACE = "default"
CLUSTER = "demo"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
IMAGES = ("node", "operator", "rabbitmq", "postgresql")  # `zstack-dev images` builds them
MN_SELECTOR = f"app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/component=mn"
CLUSTER_SELECTOR = f"app.kubernetes.io/instance={CLUSTER}"
OPERATOR_SELECTOR = f"app.kubernetes.io/name=zstack-operator,app.kubernetes.io/instance={RELEASE}"


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


# ---- Prometheus's supervisor --------------------------------------------------------------------------


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


def prometheus_running(root: Path) -> bool:
    """Whether the demo's Prometheus (its supervisor) runs in this devcluster directory."""
    return _supervisor(_paths(root)[0]) is not None


def start_prometheus(root: Path, say: Say = stderr_say, timeout: float = 120.0) -> dict[str, str]:
    """Start the supervisor unless it runs; return the servers' URLs."""
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
            raise DemoError(f"the demo's Prometheus did not start; see {log_file}:\n"
                            + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:]))
        if ticker.elapsed() > timeout:
            raise DemoError(f"the demo's Prometheus was not ready within {timeout:.0f}s; see {log_file}")
        ticker.tick(f"Prometheus (log {log_file})")
        time.sleep(0.2)
    if ticker.elapsed() > 1:
        ticker.done(f"Prometheus ready in {ticker.elapsed():.1f}s")
    return json.loads(servers_file.read_text())


def stop_prometheus(root: Path, grace: float = 60.0) -> bool:
    """Stop the supervisor and its Prometheus. False when it was not running."""
    record_file, servers_file, _ = _paths(root)
    record = _supervisor(record_file)
    if record is not None:
        procs.stop_groups([(record.pid, record.start_time)], grace)
    record_file.unlink(missing_ok=True)
    servers_file.unlink(missing_ok=True)
    return record is not None


def supervise(root: Path) -> None:
    """Run Prometheus until SIGTERM; publish its URL in a file."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Prometheus(root / "demo" / "prometheus", kubeconfig=Layout(root).kubeconfig, scrape_interval="5s",
                    say=stderr_say) as prometheus:
        servers_file = _paths(root)[1]
        tmp = servers_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"prometheus": prometheus.url}, out)
        tmp.rename(servers_file)  # atomic: a reader never sees half a file
        stderr_say("Prometheus running until SIGTERM")
        while not stop.wait(1.0):
            pass


# ---- up and down ---------------------------------------------------------------------------------------


def up(root: Path, replicas: int = 3, timeout: float = 300.0, say: Say = stderr_say) -> dict[str, Any]:
    """Bring the demo up (or check that it is); return what `print_next_steps` shows."""
    files = _check_ready_to_start(root)
    kube = Kube(Layout(root).kubeconfig)
    started = time.monotonic()
    existed = _running_parts(root, kube)
    try:
        say("1. importing the project's images into the node's containerd (never pulled)")
        node_images.load(files, node_images.project_archives(), say)
        servers = start_prometheus(root, say)
        say(f"2. namespaces {OPERATOR_NS} and {NAMESPACE} enforce Pod Security \"restricted\"")
        for namespace in (OPERATOR_NS, NAMESPACE):
            kube.kubectl("apply", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": RESTRICTED}}))
        values = root / "demo" / "values.yaml"
        values.write_text(yaml.safe_dump(chart_values(root), sort_keys=False))
        say(f"3. helm install of the operator, image {builds.image_name('operator')} (release {RELEASE} in "
            f"{OPERATOR_NS}, values {values})")
        # Helm installs a chart's CRDs only once and never upgrades them: this checkout's CRD goes first.
        kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        kube.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--values", str(values),
                  "--wait", "--timeout", "3m")
        say(f"4. kubectl apply of ZStackCluster {NAMESPACE}/{CLUSTER}: {replicas} MNs, RabbitMQ and PostgreSQL "
            f"run by the operator ({EXAMPLE.relative_to(REPO)}, with our images)")
        kube.kubectl("apply", "-f", "-", input=cluster_manifest(replicas, this_machine(root)))
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


def _check_ready_to_start(root: Path) -> NodeFiles:
    """The node's files, once the devcluster runs (`is_up` needs its container node) and every image is built."""
    if not controlplane.is_up(root):
        raise DemoError(f"the devcluster in {root} is not running: start it with `zstack-dev up --node containers`")
    for path in (CHART, CRD, EXAMPLE):
        if not path.exists():
            raise DemoError(f"{path} is missing: run the demo from a source checkout of the project")
    built = {name for archive in node_images.project_archives() for name in node_images.archive_images(archive)}
    missing = [builds.image_name(image) for image in IMAGES if builds.image_name(image) not in built]
    if missing:
        raise DemoError(f"image {', '.join(missing)} is not built: run `zstack-dev images` first")
    return NodeFiles.of(Layout(root))


def this_machine(root: Path) -> dict[str, Any]:
    """A NetworkPolicy peer for this machine (the host's end of the node's veth), where the demo's Prometheus,
    zstack-cli and curl come from. It is no pod, so no selector names it."""
    return {"ipBlock": {"cidr": f"{NodeNetwork(_node_index(root)).host_ip}/32"}}


def _node_index(root: Path) -> int:
    index = state.load(root).node_index
    if index is None:
        raise DemoError(f"the devcluster in {root} has no container node: `zstack-dev up --node containers`")
    return index


def chart_values(root: Path) -> dict[str, Any]:
    """The chart's values for this node: our operator image, and the operator's NetworkPolicy opened to what
    this node has where a cluster usually has other things. CoreDNS is a process on the node's IP (no kube-dns
    pod); the API server is reached at 10.96.0.1:443 and, after kube-proxy's DNAT, at the host's end of the
    veth on the API server's own port. The policy is enforced (kube-router), so a wrong value here breaks the
    operator, as it would on a user's cluster."""
    repository, tag = builds.image_name("operator").rsplit(":", 1)
    st = state.load(root)
    net = NodeNetwork(_node_index(root))
    service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "networkPolicy": {
            "dnsTo": [{"ipBlock": {"cidr": f"{net.node_ip}/32"}}],
            "apiServerPorts": [443, st.ports["apiserver"]],
            "apiServerCIDRs": [f"{service_ip}/32", f"{net.host_ip}/32"],
            "metricsFrom": [this_machine(root)],  # the demo's Prometheus
        },
    }


def cluster_manifest(replicas: int, api_client: dict[str, Any]) -> str:
    """examples/zstackcluster.yaml, on the images `zstack-dev images` built (imported, so never pulled); its API
    open to every pod (the default) and to `api_client`."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = NAMESPACE
    spec = manifest["spec"]
    spec.update(replicas=replicas, image=builds.image_name("node"), imagePullPolicy="Never",
                terminationGracePeriodSeconds=15)  # short, so `make demo-down` and scale-ins are quick
    spec["api"]["allowFrom"] = [{"namespaceSelector": {}}, api_client]
    spec["broker"]["managed"]["image"] = builds.image_name("rabbitmq")
    spec["database"]["managed"]["image"] = builds.image_name("postgresql")
    return json.dumps(manifest)


def down(root: Path, say: Say = stderr_say) -> bool:
    """Delete the ZStackCluster (MNs leave gracefully), uninstall the operator, stop Prometheus and recycle
    the volumes. False when nothing was running."""
    ran = False
    if controlplane.is_up(root):
        kube = Kube(Layout(root).kubeconfig)
        if kube.get("zsc", CLUSTER, "-n", NAMESPACE) is not None:
            ran = True
            say(f"deleting ZStackCluster {NAMESPACE}/{CLUSTER}; its MNs leave the ring")
            kube.kubectl("-n", NAMESPACE, "delete", "zsc", CLUSTER, "--wait=true", "--timeout=120s", check=False)
            kube.kubectl("-n", NAMESPACE, "wait", "--for=delete", "pod", "-l", CLUSTER_SELECTOR, "--timeout=90s",
                         check=False)
        if kube.helm("status", RELEASE, "--namespace", OPERATOR_NS, check=False):
            ran = True
            say(f"uninstalling the Helm release {RELEASE} (the ZStackCluster CRD stays)")
            kube.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait", "--timeout", "2m", check=False)
            kube.kubectl("-n", OPERATOR_NS, "wait", "--for=delete", "pod", "-l", OPERATOR_SELECTOR, "--timeout=60s",
                         check=False)  # helm waits for the Deployment, not for its pod
        kube.kubectl("-n", NAMESPACE, "wait", "--for=delete", "pvc", "-l", CLUSTER_SELECTOR, "--timeout=60s",
                     check=False)
        recycle_volumes(Layout(root), say)
    if stop_prometheus(root):
        ran = True
        say("Prometheus stopped")
    return ran


def _running_parts(root: Path, kube: Kube) -> list[str]:
    """What of the demo runs already (empty on a first start)."""
    parts = []
    if prometheus_running(root):
        parts.append("Prometheus")
    if kube.helm("status", RELEASE, "--namespace", OPERATOR_NS, check=False):
        parts.append(f"Helm release {RELEASE}")
    if kube.get("zsc", CLUSTER, "-n", NAMESPACE) is not None:
        parts.append(f"ZStackCluster {CLUSTER}")
    return parts


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
            ticker.done(f"5. ZStackCluster {CLUSTER}: ring {ring}, Ready ({ticker.elapsed():.1f}s)")
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
    pods = (kube.get("pods", "-n", NAMESPACE, "-l", CLUSTER_SELECTOR) or {}).get("items", [])
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
    mns = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "mn"]
    return {
        "ca_file": ca_file, "api_server_name": f"{CLUSTER}-api.{NAMESPACE}.svc", "api_port": port,
        "cluster": CLUSTER, "namespace": NAMESPACE, "ring": cr["status"]["ring"]["summary"],
        "mns": sorted(({"pod": p["metadata"]["name"], "ip": p["status"].get("podIP"),
                        "uuid": members.get(p["metadata"]["name"]), "url": f"{scheme}://{p['status'].get('podIP')}:{port}"}
                       for p in mns), key=lambda mn: mn["pod"]),
        "containers": sorted(({"pod": f"{p['metadata']['namespace']}/{p['metadata']['name']}", "image": c["image"],
                               "id": c.get("containerID", "")} for p in pods + operators
                              for c in p["status"].get("containerStatuses", [])), key=lambda c: c["pod"]),
        "operator": [{"pod": p["metadata"]["name"], "ip": p["status"].get("podIP")} for p in operators],
        "prometheus": servers["prometheus"],
        "kubeconfig": str(Layout(root).kubeconfig),
        "get_zsc": kube.kubectl("get", "zsc", "-n", NAMESPACE, check=False).rstrip(),
    }


def print_next_steps(ready: dict[str, Any], dir_arg: str = "") -> None:
    """What runs, and what to try next."""
    echo = click.echo
    echo(f"\n$ kubectl get zsc\n{ready['get_zsc']}\n")
    echo("Every pod runs in containers (containerd, runc) from the images `zstack-dev images` built:")
    for container in ready["containers"]:
        echo(f"  {container['pod']:<36} {container['image']:<44} {container['id'][:25]}")
    echo(f"\nThe operator (Helm release {RELEASE}, namespace {OPERATOR_NS}) runs {len(ready['mns'])} management "
         "nodes, and RabbitMQ and PostgreSQL for them:")
    for mn in ready["mns"]:
        echo(f"  {mn['pod']}  {mn['uuid']}  {mn['url']}")
    echo(f"prometheus {ready['prometheus']}")
    first = ready["mns"][0]
    operator_ip = ready["operator"][0]["ip"] if ready["operator"] else "<operator pod IP>"
    echo("\nTry next (pod IPs are routed from this machine into the node's network namespace):")
    token = f"kubectl get secret {CLUSTER}-api-token -o jsonpath='{{.data.token}}' | base64 -d"
    echo(f"  eval \"$(zstack-dev env{dir_arg})\"   # kubectl and helm on PATH, KUBECONFIG set")
    echo("  kubectl get zsc,pods,leases -o wide     # one Lease per MN, held by its UUID")
    echo(f"  kubectl scale zsc/{CLUSTER} --replicas=5 && kubectl get zsc -w   # RING goes 3/5 ... 5/5")
    echo(f"  kubectl delete pod {CLUSTER}-mn-1       # it returns with a new UUID; the ring converges")
    echo(f"  kubectl delete pod {CLUSTER}-postgresql-0   # it returns with its data; the MNs reconnect")
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
