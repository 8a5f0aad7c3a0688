"""The process kubelet's connection to the API server (zstack_kube's Client), and what a pod's
ServiceAccount kubeconfig needs to know of that server."""

from __future__ import annotations

import os
from dataclasses import dataclass

from zstack_kube.client import Client
from zstack_kube.login import configuration, login
from zstack_kube.paths import api_path

USER_AGENT = "zstack-devcluster-kubelet"


def connect(kubeconfig: str | os.PathLike[str]) -> Client:
    """A Client with the kubelet's own credentials: many pod workers share its pool, and their loops retry."""
    return Client(login(kubeconfig, retries=0, pool_maxsize=64, user_agent=USER_AGENT), timeout=30)


@dataclass(frozen=True)
class ClusterInfo:
    """Where the API server is and which CA signs it, for per-pod kubeconfigs."""

    server: str
    ca_pem: bytes
    tls_server_name: str | None = None


def cluster_info(kubeconfig: str | os.PathLike[str]) -> ClusterInfo:
    """Server and CA of the current context of a kubeconfig file."""
    cfg = configuration(kubeconfig)
    ca = b""
    if cfg.ssl_ca_cert:
        with open(cfg.ssl_ca_cert, "rb") as f:
            ca = f.read()
    return ClusterInfo(server=cfg.host, ca_pem=ca, tls_server_name=getattr(cfg, "tls_server_name", None) or None)


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    """The API path of a pod (or one of its subresources)."""
    return api_path("v1", "pods", namespace, name, sub)
