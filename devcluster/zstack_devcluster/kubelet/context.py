"""Settings and shared services every pod worker uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zstack_devcluster.kubelet.api import ClusterInfo
from zstack_devcluster.kubelet.envvars import ConfigError, decode_data
from zstack_devcluster.kubelet.events import Recorder
from zstack_devcluster.kubelet.ipam import PodIPAM
from zstack_kube.client import Client
from zstack_kube.errors import ApiError

# Host variables a pod must not inherit: they would point it at the host's cluster or config.
_DROP_PREFIXES = ("KUBE", "ZSTACK_", "POD_")


@dataclass(frozen=True)
class Settings:
    """Command-line tunables of the kubelet."""

    node_name: str
    root: Path
    kubeconfig: str
    backoff_initial: float = 10.0
    backoff_max: float = 300.0
    shutdown_grace: float = 8.0
    max_pods: int = 110
    cpu: str = ""
    memory: str = ""
    volume_resync: float = 30.0
    pod_cidr: str = ""  # empty: loopback pod IPs (127.0.x.y)
    taints: tuple[dict[str, str], ...] = ()  # registered with the Node when it is created


@dataclass
class Services:
    """Shared by all pod workers."""

    settings: Settings
    api: Client
    cluster: ClusterInfo
    ipam: PodIPAM
    events: Recorder
    allocatable: dict[str, str] = field(default_factory=dict)

    def lookup_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap or Secret as raw JSON; None when it does not exist."""
        plural = "configmaps" if kind == "configmap" else "secrets"
        try:
            return self.api.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise ConfigError(f"cannot read {kind} {namespace}/{name}: {e}") from e

    def lookup_data(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's or Secret's data decoded to str; None when it does not exist."""
        obj = self.lookup_object(kind, namespace, name)
        return None if obj is None else decode_data(obj, kind)


def host_env() -> dict[str, str]:
    """The kubelet's environment minus anything cluster- or project-specific."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROP_PREFIXES) and k not in ("HOSTNAME", "PWD", "OLDPWD")
    }
