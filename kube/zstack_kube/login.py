"""Log in to Kubernetes: the in-cluster ServiceAccount, else a kubeconfig; and the namespace we run in.

The kubernetes package is imported lazily: it is slow to import, and only MNs in Kubernetes need it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from zstack_kube.errors import KubeError

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def configuration(kubeconfig: str | os.PathLike[str] | None = None) -> Any:
    """A kubernetes.client.Configuration: from `kubeconfig` when given, else the in-cluster ServiceAccount,
    else $KUBECONFIG or ~/.kube/config."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=cfg)
            return cfg
        except ConfigException:
            pass
    # The kubernetes package reads $KUBECONFIG once, at its import: read it now, as kubectl would.
    path = str(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    except (ConfigException, OSError) as exc:
        where = kubeconfig or f"$KUBECONFIG={os.environ.get('KUBECONFIG', '(unset)')}"
        raise KubeError(f"cannot log in to Kubernetes: not in a cluster (no KUBERNETES_SERVICE_HOST) and no usable "
                        f"kubeconfig ({where}): {exc}") from None
    return cfg


def login(kubeconfig: str | os.PathLike[str] | None = None, *, retries: int = 1, pool_maxsize: int | None = None,
          user_agent: str | None = None) -> Any:
    """A kubernetes.client.ApiClient logged in as `configuration` says.

    `retries` is urllib3's for a failed connection: one quick retry by default, then the caller decides, so
    that an outage never hangs a caller for long; 0 when the caller's own loop is the retry."""
    from kubernetes import client

    cfg = configuration(kubeconfig)
    cfg.retries = retries
    if pool_maxsize is not None:
        cfg.connection_pool_maxsize = pool_maxsize
    api_client = client.ApiClient(configuration=cfg)
    if user_agent:
        api_client.user_agent = user_agent
    return api_client


def without_retries(api_client: Any) -> Any:
    """A new ApiClient on a copy of `api_client`'s configuration with urllib3's retries off."""
    from kubernetes import client

    cfg = copy.deepcopy(api_client.configuration)
    cfg.retries = 0
    return client.ApiClient(configuration=cfg)


def namespace(explicit: str | None) -> str:
    """The namespace: --pod-namespace / POD_NAMESPACE, else the ServiceAccount's namespace file."""
    if explicit:
        return explicit
    if SA_NAMESPACE_FILE.is_file() and SA_NAMESPACE_FILE.read_text().strip():
        return SA_NAMESPACE_FILE.read_text().strip()
    raise KubeError("Kubernetes is on but the namespace is unknown: set --pod-namespace / POD_NAMESPACE "
                    "(the downward API's metadata.namespace)")
