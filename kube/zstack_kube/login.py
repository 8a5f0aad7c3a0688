"""Kubernetes login for an MN: in-cluster, else kubeconfig; and the namespace it runs in.

The kubernetes client is imported lazily: it is slow to import and only MNs in Kubernetes need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SA_NAMESPACE_FILE = "var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeError(RuntimeError):
    """Kubernetes is on, but this MN cannot log in or does not know its namespace."""


def login() -> Any:
    """A kubernetes.client.ApiClient: the in-cluster ServiceAccount, else $KUBECONFIG or ~/.kube/config."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except ConfigException:
        try:
            config.load_kube_config(client_configuration=cfg, persist_config=False)
        except (ConfigException, OSError) as exc:
            raise KubeError(
                "cannot log in to Kubernetes: not in a cluster (no KUBERNETES_SERVICE_HOST) and no usable "
                f"kubeconfig ($KUBECONFIG={os.environ.get('KUBECONFIG', '(unset)')}): {exc}"
            ) from None
    # One quick retry of a failed connection, then the caller decides: an outage must never hang an MN.
    cfg.retries = 1
    return client.ApiClient(configuration=cfg)


def namespace(explicit: str | None) -> str:
    """The namespace: --pod-namespace / POD_NAMESPACE, else the ServiceAccount's namespace file."""
    if explicit:
        return explicit
    roots = [os.environ.get("ZSTACK_POD_ROOT"), "/"]  # the process kubelet mounts below ZSTACK_POD_ROOT
    for root in filter(None, roots):
        path = Path(root) / SA_NAMESPACE_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    raise KubeError("Kubernetes is on but the namespace is unknown: set --pod-namespace / POD_NAMESPACE "
                    "(the downward API's metadata.namespace)")
