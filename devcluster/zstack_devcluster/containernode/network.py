"""The container node's own network namespace, joined to the host by one veth pair.

Everything of the node lives in the namespace: containerd, the kubelet, kube-proxy, CoreDNS, the CNI bridge
and the pods. Its iptables rules (kube-proxy's, the kubelet's KUBE-FIREWALL) are the namespace's and vanish
with it. The host keeps IP forwarding as it is (off here), and the namespace has no default route, so
nothing from a pod can leave the machine: a pod reaches its node, the other pods, and the host's end of
the veth, where a forwarder exposes the API server (the kubelet's and the pods' way to it).

Addresses come from the shared address space 100.64.0.0/10 (RFC 6598), which no LAN or ISP route here
uses: node ``i`` gets the link 100.64.i.0/30 (host .1, node .2) and the pod network 100.96.i.0/24.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster.errors import DevclusterError

NETNS_DIR = Path("/var/run/netns")
MAX_NODES = 256


@dataclass(frozen=True)
class NodeNetwork:
    """The names and addresses of container node number ``index`` on this machine."""

    index: int

    @property
    def netns(self) -> str:
        return f"zstack-dev-{self.index}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_if(self) -> str:
        return f"zsd{self.index}h"

    @property
    def node_if(self) -> str:
        return f"zsd{self.index}n"

    @property
    def host_ip(self) -> str:
        """The host's end of the veth: where the node reaches the API server."""
        return f"100.64.{self.index}.1"

    @property
    def node_ip(self) -> str:
        """The node's end of the veth: the Node's InternalIP, the kubelet's and CoreDNS's address."""
        return f"100.64.{self.index}.2"

    @property
    def pod_cidr(self) -> str:
        return f"100.96.{self.index}.0/24"

    def enter(self) -> list[str]:
        """argv prefix that runs a command in the namespace. Only the network namespace: ``ip netns exec``
        would also remount /sys, hiding the cgroup hierarchies the kubelet and runc need."""
        return ["nsenter", f"--net={self.netns_path}", "--"]


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise DevclusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


def _host_links() -> set[str]:
    return {link["ifname"] for link in json.loads(_ip("-json", "link", "show").stdout or "[]")}


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host routes, so a new node never overlaps one."""
    out = []
    for route in json.loads(_ip("-json", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default" and not dst.startswith(("local", "broadcast")):
            try:
                out.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                continue
    return out


def claim() -> NodeNetwork:
    """The lowest node number whose namespace, links and networks are all unused on this machine, claimed by
    making its namespace: `ip netns add` refuses a name that exists, so two `up`s that start at the same
    moment in different directories never share a network."""
    links, routed = _host_links(), _host_networks()
    for index in range(MAX_NODES):
        net = NodeNetwork(index)
        mine = [ipaddress.ip_network(f"100.64.{index}.0/30"), ipaddress.ip_network(net.pod_cidr)]
        if (net.netns_path.exists() or {net.host_if, net.node_if} & links
                or any(m.overlaps(r) for m in mine for r in routed)):
            continue
        if _ip("netns", "add", net.netns, check=False).returncode == 0:
            return net
    raise DevclusterError(f"all {MAX_NODES} container node networks are in use; "
                          "run `zstack-dev down` in devcluster directories you no longer need")


def exists(net: NodeNetwork) -> bool:
    return net.netns_path.exists()


def linked(net: NodeNetwork) -> bool:
    """Whether the namespace exists and the veth joins it to the host."""
    return exists(net) and net.host_if in _host_links()


def create(net: NodeNetwork) -> None:
    """Make the namespace (unless `claim` made it), the veth pair, the addresses and the routes (idempotent)."""
    if linked(net):
        return
    if not exists(net):
        if net.host_if in _host_links():  # the host's end of a veth whose namespace was deleted by hand
            _ip("link", "delete", net.host_if)
        _ip("netns", "add", net.netns)
    try:
        _ip("link", "add", net.host_if, "type", "veth", "peer", "name", net.node_if, "netns", net.netns)
        _ip("addr", "add", f"{net.host_ip}/30", "dev", net.host_if)
        _ip("link", "set", net.host_if, "up")
        _ip("addr", "add", f"{net.node_ip}/30", "dev", net.node_if, netns=net.netns)
        _ip("link", "set", net.node_if, "up", netns=net.netns)
        _ip("link", "set", "lo", "up", netns=net.netns)
        # The host answers pods (the API server forwarder) through the node; it forwards nothing itself.
        _ip("route", "add", net.pod_cidr, "via", net.node_ip, "dev", net.host_if)
        # Inside, the node routes between its pods and the veth (a namespace's own setting, not the host's).
        subprocess.run([*net.enter(), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
    except (DevclusterError, subprocess.CalledProcessError):
        destroy(net)
        raise


def destroy(net: NodeNetwork) -> None:
    """Delete the namespace (its end of the veth, the bridge and every rule in it go along) and the host's
    end of the veth with its route. Idempotent."""
    if exists(net):
        _ip("netns", "delete", net.netns, check=False)
    if net.host_if in _host_links():
        _ip("link", "delete", net.host_if, check=False)
