"""The operator's view of the API server: objects by kind, server-side apply as its field manager.

A thin layer over zstack_kube's Client: the operator works with objects as dicts in API (camelCase) form,
exactly as its builders write them, and finds their paths in a small table of the kinds it manages.
"""

from __future__ import annotations

from typing import Any

from zstack_kube.client import APPLY_PATCH, JSON_PATCH, Client
from zstack_kube.errors import ApiError
from zstack_kube.paths import api_path
from zstack_operator.cluster import MANAGER

TIMEOUT = 10.0

# kind -> (apiVersion, plural) of everything the operator creates or reads.
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Secret": ("v1", "secrets"),
    "Service": ("v1", "services"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "StatefulSet": ("apps/v1", "statefulsets"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "PodMonitor": ("monitoring.coreos.com/v1", "podmonitors"),
    "ZStackCluster": ("zstack.io/v1alpha1", "zstackclusters"),
}


def path(kind: str, namespace: str, name: str = "", sub: str = "") -> str:
    """The namespaced API path of `kind` (a collection when `name` is empty)."""
    api_version, plural = KINDS[kind]
    return api_path(api_version, plural, namespace, name, sub)


class Kube:
    """The operator's verbs, by kind, on a kubernetes ApiClient (see zstack_kube.login)."""

    def __init__(self, api_client: Any) -> None:
        self.client = Client(api_client, timeout=TIMEOUT)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return self.client.get_or_none(path(kind, namespace, name))

    def list(self, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        return self.client.get(path(kind, namespace), labelSelector=selector or None)["items"]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager. An unchanged object is not rewritten."""
        meta = obj["metadata"]
        return self.client.patch(path(obj["kind"], meta["namespace"], meta["name"]), obj, APPLY_PATCH,
                                 fieldManager=MANAGER, force="true")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.client.create(path(obj["kind"], obj["metadata"]["namespace"]), obj, fieldManager=MANAGER)

    def create_once(self, obj: dict[str, Any]) -> bool:
        """Create `obj` unless it exists (never overwrite: it may hold generated secrets). True if created."""
        try:
            self.create(obj)
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete if present (background cascade); True if something was deleted."""
        try:
            self.client.delete(path(kind, namespace, name), {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any], uid: str) -> dict[str, Any]:
        """Replace the status of the object with this uid; 422 when the name now holds another object."""
        patch = [{"op": "test", "path": "/metadata/uid", "value": uid},
                 {"op": "add", "path": "/status", "value": status}]
        return self.client.patch(path(kind, namespace, name, "status"), patch, JSON_PATCH)

    def has_api(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `api_version` (e.g. a CRD such as ServiceMonitor)."""
        found = self.client.get_or_none(f"/apis/{api_version}")
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])
