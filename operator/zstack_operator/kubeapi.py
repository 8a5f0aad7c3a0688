"""Plain-JSON requests to the API server: server-side apply, create-once, get, list, delete, status patch.

The operator works with objects as dicts in API (camelCase) form, exactly as its builders write them, so the
generated models would only get in the way. Paths come from a small table of the kinds the operator manages.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from zstack_operator.cluster import MANAGER

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
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
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "PodMonitor": ("monitoring.coreos.com/v1", "podmonitors"),
    "ZStackCluster": ("zstack.io/v1alpha1", "zstackclusters"),
}


class ApiError(Exception):
    """A non-2xx answer from the API server; status 0 means no answer at all."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip() if status else message)
        self.status = status
        self.reason = reason
        self.message = message


def path(kind: str, namespace: str, name: str = "", sub: str = "") -> str:
    """The namespaced API path of `kind` (a collection when `name` is empty)."""
    api_version, plural = KINDS[kind]
    root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    result = f"{root}/namespaces/{quote(namespace)}/{plural}"
    if name:
        result += f"/{quote(name)}"
    return f"{result}/{sub}" if sub else result


class Kube:
    """JSON requests over a kubernetes.client.ApiClient (see zstack_node.kube.login)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def request(self, method: str, url: str, *, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json") -> dict[str, Any]:
        from kubernetes import client

        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        method, full_url, headers, data, _ = self.api_client.param_serialize(
            method, url, query_params=params, header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            response = self.api_client.call_api(method, full_url, headers, data, _request_timeout=TIMEOUT)
            raw = response.read()
        except client.ApiException as exc:
            raise _error(exc.status or 0, exc.body or b"", str(exc.reason)) from None
        except Exception as exc:  # urllib3's connection errors and timeouts
            raise ApiError(0, f"{type(exc).__name__}: {exc}") from None
        if not 200 <= response.status < 300:
            raise _error(response.status, raw, "")
        return json.loads(raw) if raw else {}

    # ---- verbs ------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        return self.request("GET", path(kind, namespace), query={"labelSelector": selector or None})["items"]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager. An unchanged object is not rewritten."""
        meta = obj["metadata"]
        return self.request("PATCH", path(obj["kind"], meta["namespace"], meta["name"]), body=obj,
                            query={"fieldManager": MANAGER, "force": "true"}, content_type=APPLY_PATCH)

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
            self.request("DELETE", path(kind, namespace, name), body={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any], uid: str) -> dict[str, Any]:
        """Replace the status of the object with this uid; 422 when the name now holds another object."""
        patch = [{"op": "test", "path": "/metadata/uid", "value": uid},
                 {"op": "add", "path": "/status", "value": status}]
        return self.request("PATCH", path(kind, namespace, name, "status"), body=patch, content_type=JSON_PATCH)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path(obj["kind"], obj["metadata"]["namespace"]), body=obj,
                            query={"fieldManager": MANAGER})

    def has_api(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `api_version` (e.g. a CRD such as ServiceMonitor)."""
        try:
            resources = self.request("GET", f"/apis/{api_version}")["resources"]
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in resources)


def _error(status: int, raw: bytes | str, fallback: str) -> ApiError:
    try:
        doc = json.loads(raw)
        return ApiError(status, doc.get("message", fallback), doc.get("reason", ""))
    except (ValueError, TypeError, AttributeError):
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return ApiError(status, text[:500] or fallback)
