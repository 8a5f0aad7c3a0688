"""REST paths of the API server's objects."""

from __future__ import annotations

from urllib.parse import quote


def api_path(api_version: str, plural: str, namespace: str | None = None, name: str = "", sub: str = "") -> str:
    """The path of a collection (no `name`), an object, or its subresource `sub`.

    >>> api_path("coordination.k8s.io/v1", "leases", "ns", "mn-0")
    '/apis/coordination.k8s.io/v1/namespaces/ns/leases/mn-0'
    >>> api_path("v1", "pods", "ns", "p", "status")
    '/api/v1/namespaces/ns/pods/p/status'
    """
    path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    if namespace is not None:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    return f"{path}/{sub}" if sub else path
