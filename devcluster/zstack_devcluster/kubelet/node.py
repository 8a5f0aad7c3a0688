"""The Node object and its Lease: register once, then keep both fresh."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from zstack_devcluster.kubelet.context import Settings
from zstack_devcluster.kubelet.envvars import HOST_IP
from zstack_kube.client import Client
from zstack_kube.errors import ApiError
from zstack_kube.times import micro_time, now

log = logging.getLogger(__name__)

LEASE_NS = "kube-node-lease"
LEASE_DURATION = 40  # seconds, the kubelet default
RENEW_INTERVAL = 10.0  # seconds; 1/4 of the lease duration like the real kubelet
STATUS_INTERVAL = 60.0  # seconds between Ready heartbeats in the Node status
# Nothing limits a pod's processes, so the node advertises at least this much; flags override it.
MIN_CPU = 16
MIN_MEMORY_KI = 64 * 1024 * 1024


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _mem_total_ki() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


def capacity(settings: Settings) -> dict[str, str]:
    """cpu, memory, pods and ephemeral-storage the node advertises."""
    st = os.statvfs(settings.root)
    return {
        "cpu": settings.cpu or str(max(os.cpu_count() or 1, MIN_CPU)),
        "memory": settings.memory or f"{max(_mem_total_ki(), MIN_MEMORY_KI)}Ki",
        "pods": str(settings.max_pods),
        "ephemeral-storage": f"{st.f_blocks * st.f_frsize // 1024}Ki",
    }


class NodeAgent:
    """Registers the Node, renews its Lease and posts Ready heartbeats."""

    def __init__(self, api: Client, settings: Settings, kubelet_port: int = 0) -> None:
        self.api = api
        self.kubelet_port = kubelet_port
        self.settings = settings
        self.name = settings.node_name
        self.capacity = capacity(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node", daemon=True)
        self._uid = ""
        self._version = "v0.0.0"
        self._transitions: dict[str, tuple[str, str]] = {}

    def start(self) -> None:
        """Register (retrying until the API server answers), then keep things fresh in a thread."""
        while not self._stop.is_set():
            try:
                self._version = self.api.get("/version").get("gitVersion", self._version)
                self.register()
                self.renew_lease()
                break
            except ApiError as e:
                log.warning("node registration failed, retrying: %s", e)
                self._stop.wait(2)
        self._thread.start()

    def request_stop(self) -> None:
        """Make start() give up retrying and the renew loop end."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        last_status = 0.0
        while not self._stop.wait(RENEW_INTERVAL):
            try:
                self.renew_lease()
            except ApiError as e:
                log.warning("lease renewal failed: %s", e)
            if last_status + STATUS_INTERVAL <= time.monotonic():
                try:
                    self.post_status()
                    last_status = time.monotonic()
                except ApiError as e:
                    if e.status == 404:  # someone deleted the Node: register again
                        self._safe_register()
                    else:
                        log.warning("node status update failed: %s", e)

    def _safe_register(self) -> None:
        try:
            self.register()
        except ApiError as e:
            log.warning("node re-registration failed: %s", e)

    # ---- Node ---------------------------------------------------------------------------------

    def labels(self) -> dict[str, str]:
        arch = _arch()
        return {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": arch,
            "node.zstack.io/process-kubelet": "true",
        }

    def status(self) -> dict[str, Any]:
        ts = now()
        conds = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
        ]
        machine_id = _read("/etc/machine-id") or uuid.uuid5(uuid.NAMESPACE_DNS, self.name).hex
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": m,
                 "lastHeartbeatTime": ts, "lastTransitionTime": self._transition(t, s, ts)}
                for t, s, r, m in conds
            ],
            # No Hostname address: the API server would try to resolve it before InternalIP.
            "addresses": [{"type": "InternalIP", "address": HOST_IP}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": machine_id,
                "systemUUID": machine_id,
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": _os_image(),
                "containerRuntimeVersion": "process://devcluster",
                "kubeletVersion": self._version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _arch(),
            },
        }

    def _transition(self, ctype: str, status: str, ts: str) -> str:
        prev = self._transitions.get(ctype)
        if prev is None or prev[0] != status:
            prev = (status, ts)
            self._transitions[ctype] = prev
        return prev[1]

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.settings.pod_cidr:
            spec.update(podCIDR=self.settings.pod_cidr, podCIDRs=[self.settings.pod_cidr])
        if self.settings.taints:
            spec["taints"] = [dict(t) for t in self.settings.taints]
        return spec

    def register(self) -> None:
        """Create the Node, or adopt an existing one of the same name."""
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels()},
            "spec": self.spec(),
            "status": self.status(),
        }
        try:
            node = self.api.create("/api/v1/nodes", body)
            log.info("registered node %s", self.name)
        except ApiError as e:
            if e.status != 409:
                raise
            node = self.api.patch(f"/api/v1/nodes/{self.name}", {"metadata": {"labels": self.labels()}})
            log.info("node %s exists; taking it over", self.name)
        self._uid = node["metadata"]["uid"]
        self.post_status()

    def post_status(self) -> None:
        self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": self.status()})

    # ---- Lease --------------------------------------------------------------------------------

    def renew_lease(self) -> None:
        """Create or renew coordination.k8s.io Lease kube-node-lease/<node>."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NS}/leases"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_DURATION, "renewTime": micro_time()}
        try:
            lease = self.api.get(f"{path}/{self.name}")
        except ApiError as e:
            if e.status != 404:
                raise
            owner = [{"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self._uid}] if self._uid else []
            self.api.create(path, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": LEASE_NS, "ownerReferences": owner},
                "spec": spec,
            })
            return
        lease["spec"].update(spec)
        self.api.replace(f"{path}/{self.name}", lease)
