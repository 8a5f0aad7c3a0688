"""Pod identity: bound ServiceAccount tokens from the TokenRequest API.

Every pod gets
  identity/kubeconfig                      server + CA of the cluster, user = the pod's SA token;
                                           exported to the containers as KUBECONFIG
  identity/serviceaccount/{token,ca.crt,namespace}
                                           what in-cluster clients read; linked into each
                                           container root at /var/run/secrets/kubernetes.io/serviceaccount
                                           unless the pod mounts its own volume there.
KUBERNETES_SERVICE_HOST is never set, so "in-cluster, else kubeconfig" clients pick the
kubeconfig and talk to the API server as the pod's ServiceAccount: RBAC applies for real.

Tokens are requested like the real kubelet does: bound to the pod object, the API
server's default audience, 3607 s (the API server may extend such tokens), and
refreshed once 80% of the requested lifetime has passed.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from zstack_devcluster.kubelet.api import ClusterInfo
from zstack_devcluster.kubelet.paths import PodPaths
from zstack_devcluster.kubelet.volumes import VolumeError
from zstack_kube.client import Client
from zstack_kube.errors import ApiError

DEFAULT_EXPIRATION = 3607
MIN_EXPIRATION = 600


class PodIdentity:
    """Tokens and credential files of one pod."""

    def __init__(self, api: Client, cluster: ClusterInfo, pod: dict[str, Any], paths: PodPaths) -> None:
        self._api = api
        self._cluster = cluster
        self._paths = paths
        meta, spec = pod["metadata"], pod["spec"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.pod_uid: str = meta["uid"]
        self.service_account: str = spec.get("serviceAccountName") or "default"
        self.automount = spec.get("automountServiceAccountToken") is not False
        self._lock = threading.Lock()
        # (audience, expirationSeconds) -> (token, refresh_at)
        self._tokens: dict[tuple[str, int], tuple[str, float]] = {}

    @property
    def kubeconfig(self) -> Path:
        return self._paths.identity / "kubeconfig"

    def token(self, audience: str = "", expiration: int = DEFAULT_EXPIRATION) -> str:
        """A valid token for the audience ("" = API server default); cached until due for refresh."""
        expiration = max(int(expiration), MIN_EXPIRATION)
        key = (audience, expiration)
        with self._lock:
            cached = self._tokens.get(key)
            if cached and time.time() < cached[1]:
                return cached[0]
        tok = self._request(audience, expiration)
        with self._lock:
            self._tokens[key] = (tok, time.time() + 0.8 * expiration)
        return tok

    def refresh_due(self) -> bool:
        """Whether any cached token should be renewed now."""
        with self._lock:
            return any(time.time() >= at for _, at in self._tokens.values())

    def _request(self, audience: str, expiration: int) -> str:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": expiration,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.pod_uid},
            },
        }
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{self.service_account}/token"
        try:
            out = self._api.create(path, body)
        except ApiError as e:
            raise VolumeError(
                f'cannot get a token for serviceaccount "{self.namespace}/{self.service_account}": {e}'
            ) from e
        return out["status"]["token"]

    def write(self) -> None:
        """(Re)write the kubeconfig and the serviceaccount files."""
        ident = self._paths.identity
        ident.mkdir(parents=True, exist_ok=True)
        user: dict[str, Any] = {}
        if self.automount:
            tok = self.token()
            sa = ident / "serviceaccount"
            sa.mkdir(exist_ok=True)
            _write(sa / "token", tok.encode(), 0o600)
            _write(sa / "ca.crt", self._cluster.ca_pem, 0o644)
            _write(sa / "namespace", self.namespace.encode(), 0o644)
            user = {"token": tok}
        cluster: dict[str, Any] = {"server": self._cluster.server}
        if self._cluster.ca_pem:
            cluster["certificate-authority-data"] = base64.b64encode(self._cluster.ca_pem).decode()
        if self._cluster.tls_server_name:
            cluster["tls-server-name"] = self._cluster.tls_server_name
        ctx = f"{self.service_account}@devcluster"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "devcluster", "cluster": cluster}],
            "users": [{"name": self.service_account, "user": user}],
            "contexts": [
                {"name": ctx, "context": {"cluster": "devcluster", "user": self.service_account,
                                          "namespace": self.namespace}}
            ],
            "current-context": ctx,
        }
        _write(self.kubeconfig, yaml.safe_dump(doc, sort_keys=False).encode(), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
