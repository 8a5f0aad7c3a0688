"""The container node's processes, and the steps around them that `up` and `down` take.

`up` (after the control plane): make the network namespace and the cgroup root, write the configs; start
the API server's forwarder on the host's end of the veth and containerd; import the images; publish the
`kubernetes` endpoints and the volumes; then start the kubelet, kube-proxy and CoreDNS inside the namespace.

`down` (before the control plane): stop the kubelet, kill every pod process and shim, stop the rest,
unmount what is left under ``DIR/node``, remove the cgroups and the namespace, and restore the sysctls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

from zstack_devcluster.components import Component, Ports
from zstack_devcluster.containernode import config, host, images, network
from zstack_devcluster.containernode.config import NodeFiles
from zstack_devcluster.containernode.network import NodeNetwork
from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.health import node_ready
from zstack_devcluster.layout import NODE_NAME, Layout
from zstack_devcluster.progress import Say
from zstack_devcluster.tools import tool_path

RUNTIME = ("apiserver-bridge", "containerd")
AGENTS = ("kubelet", "kube-proxy", "coredns")
POLICY = ("network-policy",)  # after the kubelet: kube-router exits when it finds no Node of its name
DEBIAN_COMMANDS = {"containerd": "containerd", "ctr": "containerd", "runc": "runc", "socat": "socat",
                   "nsenter": "util-linux", "iptables": "iptables", "ipset": "ipset",
                   "/usr/lib/cni/bridge": "containernetworking-plugins"}


def check_host() -> None:
    """The Debian packages the node runs on, and root (namespaces, cgroups and mounts need it)."""
    missing = sorted({pkg for cmd, pkg in DEBIAN_COMMANDS.items()
                      if not (Path(cmd).exists() if cmd.startswith("/") else shutil.which(cmd))})
    if missing:
        raise DevclusterError(f"the container node needs {', '.join(missing)}: apt-get install {' '.join(missing)} "
                              "(make install does it)")
    if os.geteuid() != 0:
        raise DevclusterError("the container node makes network namespaces, cgroups and mounts: run it as root")


def components(lay: Layout, net: NodeNetwork) -> tuple[Component, ...]:
    """The node's processes; all but the forwarder run inside the node's network namespace."""
    files = NodeFiles.of(lay)

    def bridge(_lay: Layout, p: Ports) -> list[str]:
        port = p["apiserver"]
        return ["socat", f"TCP-LISTEN:{port},bind={net.host_ip},fork,reuseaddr", f"TCP:127.0.0.1:{port}"]

    def containerd(_lay: Layout, _p: Ports) -> list[str]:
        return [*net.enter(), "containerd", "--config", str(files.config("containerd.toml"))]

    def kubelet(_lay: Layout, _p: Ports) -> list[str]:
        return [*net.enter(), str(tool_path("kubelet")), f"--config={files.config('kubelet.yaml')}",
                f"--kubeconfig={files.config(config.kubeconfig_name('kubelet'))}", f"--root-dir={files.kubelet_root}",
                f"--hostname-override={NODE_NAME}", f"--node-ip={net.node_ip}", "--v=1"]

    def kube_proxy(_lay: Layout, _p: Ports) -> list[str]:
        return [*net.enter(), str(tool_path("kube-proxy")), f"--config={files.config('kube-proxy.yaml')}"]

    def coredns(_lay: Layout, _p: Ports) -> list[str]:
        return [*net.enter(), str(tool_path("coredns")), "-conf", str(files.config("Corefile"))]

    def network_policy(_lay: Layout, _p: Ports) -> list[str]:
        # kube-router's firewall controller alone: the bridge CNI keeps routing, kube-proxy the Services.
        return [*net.enter(), str(tool_path("kube-router")),
                f"--kubeconfig={files.config(config.kubeconfig_name('kube-router'))}",
                f"--hostname-override={NODE_NAME}", "--run-firewall=true", "--run-router=false",
                "--run-service-proxy=false", "--enable-cni=false", "--enable-ipv6=false", "--metrics-port=0",
                f"--health-port={config.NETWORK_POLICY_HEALTH_PORT}", "--iptables-sync-period=1m", "--v=1"]

    return (
        Component("apiserver-bridge", (), bridge, lambda _l, p, _c: _connects(net.host_ip, p["apiserver"]),
                  f"API server on {net.host_ip}"),
        Component("containerd", (), containerd, lambda _l, _p, _c: _containerd_up(files), "containerd answers"),
        Component("kubelet", (), kubelet, lambda _l, p, ctx: node_ready(p["apiserver"], NODE_NAME, ctx),
                  f"Node {NODE_NAME} Ready"),
        Component("kube-proxy", (), kube_proxy,
                  lambda _l, _p, _c: _http_ok(f"http://{net.node_ip}:{config.KUBE_PROXY_HEALTH_PORT}/healthz"),
                  "/healthz"),
        Component("coredns", (), coredns, lambda _l, _p, _c: _http_ok(f"http://{net.node_ip}:8080/health"),
                  "/health"),
        Component("network-policy", (), network_policy,
                  lambda _l, _p, _c: _http_ok(f"http://{net.node_ip}:{config.NETWORK_POLICY_HEALTH_PORT}/healthz"),
                  "kube-router /healthz"),
    )


def prepare(lay: Layout, net: NodeNetwork, ports: Ports, sysctls: dict[str, str], say: Say) -> dict[str, str]:
    """Network, cgroup root and configs; returns the sysctls to restore at `down` (recorded once)."""
    check_host()
    if not network.linked(net):
        say(f"  node network: namespace {net.netns}, veth {net.host_if} {net.host_ip} <-> {net.node_ip}, "
            f"pods {net.pod_cidr}")
    network.create(net)
    host.make_cgroup_root(NodeFiles.of(lay).cgroup_root(net))
    config.write_all(lay, net, ports["apiserver"])
    return sysctls or host.read_sysctls()


def publish(lay: Layout, net: NodeNetwork, ports: Ports, say: Say) -> None:
    """Import the pause image and the project's images; publish the `kubernetes` endpoints, the volumes and
    the roles of the node's components."""
    files = NodeFiles.of(lay)
    images.load(files, [images.pause_archive(say), *images.project_archives()], say)
    for index in range(config.VOLUMES):
        files.volume(index).mkdir(parents=True, exist_ok=True)
        files.volume(index).chmod(0o1777)
    objects = [config.kubernetes_endpoints(net, ports["apiserver"]), *config.storage(files),
               *config.component_roles()]
    proc = subprocess.run([str(tool_path("kubectl")), f"--kubeconfig={lay.kubeconfig}", "apply", "-f", "-"],
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise DevclusterError(f"publishing the kubernetes endpoints and volumes failed: {proc.stderr.strip()}")
    recycle_volumes(lay, say)


def recycle_volumes(lay: Layout, say: Say) -> list[str]:
    """Empty every volume whose claim is gone (phase Released) and make it Available again, as a local
    static provisioner does; returns their names. Without this a deleted cloud's volumes stay bound to
    nothing, and each `demo up` after a `demo down` would take two more until none is left."""
    kubectl = [str(tool_path("kubectl")), f"--kubeconfig={lay.kubeconfig}"]
    selector = ",".join(f"{key}={value}" for key, value in config.MANAGED_LABELS.items())
    listed = subprocess.run([*kubectl, "get", "pv", "-l", selector, "-o", "json"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise DevclusterError(f"listing the node's volumes failed: {listed.stderr.strip()}")
    released = [pv for pv in json.loads(listed.stdout)["items"] if pv.get("status", {}).get("phase") == "Released"]
    for pv in released:
        directory = Path(pv["spec"]["hostPath"]["path"])
        say(f"  recycling volume {pv['metadata']['name']} (its claim {pv['spec']['claimRef']['name']} is gone)")
        for entry in directory.iterdir() if directory.is_dir() else ():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        patch = subprocess.run([*kubectl, "patch", "pv", pv["metadata"]["name"], "--type=json",
                                "-p", '[{"op": "remove", "path": "/spec/claimRef"}]'], capture_output=True, text=True)
        if patch.returncode != 0:
            raise DevclusterError(f"recycling volume {pv['metadata']['name']} failed: {patch.stderr.strip()}")
    return [pv["metadata"]["name"] for pv in released]


def kill_pods(lay: Layout, net: NodeNetwork) -> None:
    """Kill every process of every pod, then containerd's shims, and remove the shims' sockets."""
    files = NodeFiles.of(lay)
    sockets = shim_sockets(files)  # before the kill: containerd forgets a task once its shim is gone
    host.kill_pids(host.cgroup_pids(files.cgroup_root(net)), "pod processes")
    host.kill_pids(host.shims_of(files.containerd_socket), "containerd shims")
    for socket_path in sockets:
        socket_path.unlink(missing_ok=True)


def shim_sockets(files: NodeFiles) -> list[Path]:
    """Where containerd 1.6 puts each task's shim socket: /run/containerd/s/sha256(<address>/<ns>/<id>)."""
    tasks = files.containerd_state / "io.containerd.runtime.v2.task"
    out = []
    for ns_dir in tasks.iterdir() if tasks.is_dir() else ():
        for task in ns_dir.iterdir():
            key = f"{files.containerd_socket}/{ns_dir.name}/{task.name}"
            out.append(Path("/run/containerd/s") / hashlib.sha256(key.encode()).hexdigest())
    return out


def teardown(lay: Layout, net: NodeNetwork, sysctls: dict[str, str], say: Say) -> None:
    """Give the host back what the node took (after every node process has stopped)."""
    files = NodeFiles.of(lay)
    kill_pods(lay, net)
    still_mounted = host.unmount_all(files.root)
    left = host.remove_cgroup_root(files.cgroup_root(net))
    host.remove_log_links(files.pod_logs)
    network.destroy(net)
    host.restore_sysctls(sysctls)
    if still_mounted or left:
        say(f"  warning: could not remove {', '.join([*still_mounted, *map(str, left)])}")


def _connects(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


def _containerd_up(files: NodeFiles) -> bool:
    if not files.containerd_socket.exists():
        return False
    try:
        images.ctr(files, "version", timeout=5)
    except (DevclusterError, subprocess.TimeoutExpired):
        return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
