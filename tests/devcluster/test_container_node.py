"""`zstack-dev up --node containers`: containerd, runc, the CNI bridge, a real kubelet, kube-proxy and CoreDNS
in a network namespace of their own, running pods from our own images; and `down` leaves the host as it was.

The tests run in file order: the last one takes the node down and compares the host with what it was
before `up` (processes, mounts, network namespaces, links, routes, iptables, ipsets, cgroups, sysctls,
the host's pod log directories).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures.containernode import ContainerNode, restricted, wait_for
from zstack_devcluster import controlplane, procs, tools
from zstack_devcluster import images as builds
from zstack_devcluster.containernode import config, host, network
from zstack_devcluster.containernode import node as container_node
from zstack_devcluster.containernode.config import NodeFiles
from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.layout import NODE_NAME, Layout
from zstack_devcluster.state import load

pytestmark = [pytest.mark.k8s, pytest.mark.slow, pytest.mark.timeout(900)]

IMAGE = builds.image_name("node")  # has Python: the pods below are small scripts


def ours(name: str) -> bool:
    """Names the container node gives its namespaces and links (other tools on this machine make their own)."""
    return name.startswith(("zstack-dev-", "zsd")) and not name.startswith("zsd-")


def host_snapshot() -> dict[str, object]:
    """What the node could leave behind on the host."""

    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    def rules(table: str) -> list[str]:  # counters and comments of chains change; the rules must not
        return sorted(line for line in run("iptables-save", "-t", table).splitlines() if line[:1] in ("-", ":"))

    return {
        "netns": sorted(n for n in os.listdir("/var/run/netns") if ours(n)) if os.path.isdir("/var/run/netns") else [],
        "links": sorted(link["ifname"] for link in json.loads(run("ip", "-json", "link")) if ours(link["ifname"])),
        "routes": run("ip", "route", "show", "table", "all"),
        "iptables": {t: [r.split(" [")[0] for r in rules(t)] for t in ("filter", "nat", "mangle")},
        "ipsets": sorted(run("ipset", "list", "-name").split()),  # kube-router's NetworkPolicy sets
        "mounts": sorted(point for point in (line.split()[4] for line in open("/proc/self/mountinfo"))
                         if not point.startswith("/run/netns/") or ours(point.removeprefix("/run/netns/"))),
        "cgroups": sorted(str(p) for h in host.hierarchies() for p in h.iterdir() if p.is_dir()),
        "sysctls": host.read_sysctls(),
        "shim sockets": sorted(os.listdir("/run/containerd/s")) if os.path.isdir("/run/containerd/s") else [],
        "pod logs": {d: sorted(os.listdir(d)) if os.path.isdir(d) else []
                     for d in ("/var/log/pods", "/var/log/containers")},
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, images_built: object) -> Iterator[tuple[ContainerNode, dict]]:
    before = host_snapshot()
    cluster, said = ContainerNode.start(tmp_path_factory.mktemp("containernode"))
    try:
        assert "node network: namespace zstack-dev-" in said, "up says which network it made"
        yield cluster, before
    finally:
        cluster.zstack_dev("down")  # a no-op when the last test already took it down


def test_the_node_runs_containerd_on_an_address_of_its_own(node: tuple[ContainerNode, dict]) -> None:
    cluster, _ = node
    got = cluster.get("node", NODE_NAME)
    assert got["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.6")
    assert got["status"]["nodeInfo"]["kubeletVersion"] == tools.K8S_VERSION
    internal = [a["address"] for a in got["status"]["addresses"] if a["type"] == "InternalIP"]
    assert len(internal) == 1 and ipaddress.ip_address(internal[0]) in ipaddress.ip_network("100.64.0.0/10")
    assert load(cluster.root).node == "containers"


POD_CHECKS = """
import socket, ssl, time, urllib.request

def get(url, **kwargs):
    # As any client must: kube-proxy programs a new Service's rules a moment after its endpoints exist.
    deadline = time.monotonic() + 60
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5, **kwargs).status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

print("web", get("http://web.probe.svc.cluster.local/"))
token = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()
ctx = ssl.create_default_context(cafile="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
req = urllib.request.Request("https://kubernetes.default.svc/version", headers={"Authorization": "Bearer " + token})
print("api", get(req, context=ctx))
try:
    print("outside", socket.gethostbyname("example.com"))
except OSError:
    print("outside unresolved")
"""


def test_pods_run_in_containers_and_reach_services_by_dns_name(node: tuple[ContainerNode, dict]) -> None:
    cluster, _ = node
    cluster.kubectl("create", "namespace", "probe")
    cluster.kubectl("label", "namespace", "probe", "pod-security.kubernetes.io/enforce=restricted")
    web = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web", "namespace": "probe", "labels": {"app": "web"}},
           "spec": {"containers": [restricted({"name": "web", "image": IMAGE, "command": [
               "python", "-m", "http.server", "8000", "--directory", "/opt/venv"],
               "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1}})]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "probe"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]}}
    cluster.apply(web, service)
    cluster.kubectl("wait", "-n", "probe", "--for=condition=Ready", "pod/web", "--timeout=90s")
    # The client starts once the Service has its endpoint, as an MN starts after its broker is Ready.
    client = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": "probe"},
              "spec": {"restartPolicy": "Never", "containers": [restricted(
                  {"name": "client", "image": IMAGE, "command": ["python", "-c", POD_CHECKS]})]}}
    cluster.apply(client)
    phase = wait_for("the client pod to finish", lambda: {"Succeeded", "Failed"} & {
        cluster.get("pod", "client", "probe")["status"].get("phase")})
    out = cluster.kubectl("logs", "-n", "probe", "client").stdout
    assert phase == {"Succeeded"}, out
    assert out.split("\n")[:4] == ["web 200", "api 200", "outside unresolved", ""], out
    for name in ("web", "client"):
        status = cluster.get("pod", name, "probe")["status"]
        assert status["containerStatuses"][0]["containerID"].startswith("containerd://"), status
        assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network("100.96.0.0/12")


# The Node authorizer answers from a graph of pods bound to nodes, which lags the API by a moment: a kubelet
# that reads a pod just bound to it may be refused once, and retries (as on any cluster).
NODE_GRAPH_LAG = "no relationship found between node"
IDENTITIES = {"kubelet": ("system:node:devcluster", ["system:nodes", "system:authenticated"]),
              "kube-proxy": ("system:kube-proxy", ["system:authenticated"]),
              "coredns": ("zstack-dev:coredns", ["system:authenticated"]),
              "kube-router": ("zstack-dev:kube-router", ["system:authenticated"])}


def test_each_component_of_the_node_is_itself_to_the_api_server_never_the_admin(
        node: tuple[ContainerNode, dict]) -> None:
    cluster, _ = node
    files = NodeFiles.of(Layout(cluster.root))
    assert set(IDENTITIES) == set(config.IDENTITIES)
    def as_component(component: str, *args: str) -> str:
        kubeconfig = files.config(config.kubeconfig_name(component))
        proc = subprocess.run([str(tools.tool_path("kubectl")), f"--kubeconfig={kubeconfig}", *args],
                              capture_output=True, text=True, timeout=60)
        return proc.stdout.strip()

    for component, (user, groups) in IDENTITIES.items():
        who = json.loads(as_component(component, "auth", "whoami", "-o", "json"))["status"]["userInfo"]
        assert (who["username"], sorted(who["groups"])) == (user, sorted(groups)), component
        for forbidden in (("list", "secrets", "--all-namespaces"), ("update", "leases", "-n", "kube-system"),
                          ("create", "clusterrolebindings")):
            answer = as_component(component, "auth", "can-i", *forbidden)  # "no", maybe with a reason
            assert answer.split()[0] == "no", f"{component} may {forbidden}: {answer}"
        log = (Layout(cluster.root).log("network-policy" if component == "kube-router" else component)).read_text()
        refused = [line for line in log.splitlines() if "forbidden" in line.lower()
                   and NODE_GRAPH_LAG not in line]
        assert not refused, f"{component} was refused something it needs: {refused[:5]}"


def test_down_leaves_the_host_as_it_was(node: tuple[ContainerNode, dict]) -> None:
    cluster, before = node
    pids = [rec.pid for rec in load(cluster.root).procs.values()]
    pod_pids = host.cgroup_pids(f"zstack-dev-{load(cluster.root).node_index}")
    assert pod_pids, "the pods' processes live in the node's cgroups"
    down = cluster.zstack_dev("down")
    assert down.returncode == 0, down.stderr
    alive = [pid for pid in [*pids, *pod_pids] if Path(f"/proc/{pid}").exists()
             and not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")]
    assert alive == [], f"processes left running: {alive}"
    after = host_snapshot()
    for key, value in before.items():
        assert after[key] == value, f"{key} changed: {value} -> {after[key]}"
    assert host.mounts_under(cluster.root) == []


def test_an_up_that_fails_partway_gives_the_host_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` fails after it made the node's network, cgroups and containerd (here: at the image import, as a
    full disk made it fail once); it stops what it started and leaves no namespace, veth or cgroup behind."""
    before = host_snapshot()

    def import_fails(*_args: object) -> None:
        raise DevclusterError("ctr images import failed: no space left on device")

    monkeypatch.setattr(container_node, "publish", import_fails)
    said: list[str] = []
    with pytest.raises(DevclusterError, match="no space left"):
        controlplane.up(tmp_path, say=said.append, node="containers")
    assert any("node network: namespace zstack-dev-" in line for line in said), said
    assert all(not rec.pid or not procs.record_alive(rec) for rec in load(tmp_path).procs.values())
    assert load(tmp_path).node_index is None, "the network is given back, so state forgets it"
    after = host_snapshot()
    for key, value in before.items():
        assert after[key] == value, f"{key} changed: {value} -> {after[key]}"


def test_ups_that_start_together_never_share_a_node_network() -> None:
    """Each `up` claims its network by creating its namespace, which only one of them can do."""
    barrier = threading.Barrier(4)

    def claim_together() -> network.NodeNetwork:
        barrier.wait()
        return network.claim()

    with ThreadPoolExecutor(4) as pool:
        claimed = list(pool.map(lambda _: claim_together(), range(4)))
    try:
        assert len({net.index for net in claimed}) == 4, [net.index for net in claimed]
        assert all(network.exists(net) for net in claimed)
    finally:
        for net in claimed:
            network.destroy(net)
