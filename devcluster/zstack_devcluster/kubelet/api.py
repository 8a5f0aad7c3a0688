"""A thin JSON layer over the kubernetes client's ApiClient.

The kubelet works with plain dicts in API (camelCase) form, exactly as the
API server sends them; the generated models would only get in the way.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import yaml
from kubernetes import client, config

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server (status 0: no answer at all)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ClusterInfo:
    """Where the API server is and which CA signs it, for per-pod kubeconfigs."""

    server: str
    ca_pem: bytes
    tls_server_name: str | None = None


def now() -> str:
    """Current time as an RFC 3339 timestamp with second precision (metav1.Time)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """Current time as metav1.MicroTime."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_rfc3339(ts: float) -> str:
    """A unix timestamp as metav1.Time."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    """metav1.Time or MicroTime to a unix timestamp."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def cluster_info(kubeconfig: str) -> ClusterInfo:
    """Read server and CA of the current context of a kubeconfig file."""
    with open(kubeconfig) as f:
        doc = yaml.safe_load(f)
    ctx_name = doc.get("current-context")
    contexts = {c["name"]: c["context"] for c in doc.get("contexts") or []}
    clusters = {c["name"]: c["cluster"] for c in doc.get("clusters") or []}
    ctx = contexts.get(ctx_name) or next(iter(contexts.values()))
    cluster = clusters[ctx["cluster"]]
    if cluster.get("certificate-authority-data"):
        ca = base64.b64decode(cluster["certificate-authority-data"])
    elif cluster.get("certificate-authority"):
        path = cluster["certificate-authority"]
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(kubeconfig)), path)
        with open(path, "rb") as f:
            ca = f.read()
    else:
        ca = b""
    return ClusterInfo(server=cluster["server"], ca_pem=ca, tls_server_name=cluster.get("tls-server-name"))


class Api:
    """JSON requests to the API server with the kubelet's own credentials."""

    def __init__(self, kubeconfig: str) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 64
        cfg.retries = False
        self._client = client.ApiClient(cfg)
        self._client.user_agent = "devcluster-process-kubelet/0.1"

    def close(self) -> None:
        """Drop pooled connections."""
        self._client.rest_client.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = 30,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        m, url, hdrs, data, _ = self._client.param_serialize(
            method, path, query_params=params, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            resp = self._client.call_api(m, url, hdrs, data, _request_timeout=timeout)
        except client.ApiException as e:
            raise ApiError(e.status or 0, str(e.reason), "") from e
        except Exception as e:  # urllib3 connection errors and friends
            raise ApiError(0, f"{type(e).__name__}: {e}") from e
        return resp

    def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """Send one request; return the decoded JSON answer or raise ApiError."""
        resp = self._send(method, path, **kw)
        try:
            raw = resp.read()
        except Exception as e:
            raise ApiError(0, f"{type(e).__name__}: {e}") from e
        if not 200 <= resp.status < 300:
            raise _error(resp.status, raw)
        return json.loads(raw) if raw else {}

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self.request("GET", path, query=query)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=body)

    def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, body=body)

    def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> dict[str, Any]:
        return self.request("PATCH", path, body=body, content_type=content_type)

    def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request("DELETE", path, body=body)

    def watch(self, path: str, timeout_seconds: int = 300, **query: Any) -> Iterator[dict[str, Any]]:
        """Yield watch events ({type, object}) until the server ends the stream."""
        query = dict(query, watch="true", timeoutSeconds=timeout_seconds, allowWatchBookmarks="true")
        resp = self._send("GET", path, query=query, timeout=(10, timeout_seconds + 30))
        raw = resp.response
        try:
            if not 200 <= resp.status < 300:
                raise _error(resp.status, resp.read())
            buf = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.release_conn()


def _error(status: int, raw: bytes) -> ApiError:
    try:
        doc = json.loads(raw)
        return ApiError(status, doc.get("message", ""), doc.get("reason", ""))
    except (ValueError, AttributeError):
        return ApiError(status, raw[:500].decode(errors="replace"))


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    """The API path of a pod (or one of its subresources)."""
    path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
    return f"{path}/{sub}" if sub else path
