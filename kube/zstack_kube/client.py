"""JSON requests and watches to the API server, with plain dicts in API (camelCase) form.

Built on the kubernetes package's ApiClient (its configuration, TLS, auth and connection pool), without its
generated models: every caller here works with objects exactly as the API server sends them, and builds
them as dicts, so the models would only convert back and forth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from zstack_kube.errors import ApiError

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

Timeout = float | tuple[float, float | None]  # total, or (connect, read); read None: none


class Client:
    """One API server, as the ApiClient `api_client` logs in to it.

    Every call has a timeout (`timeout` unless the call gives its own). Errors are ApiError, never the
    kubernetes package's exceptions. With `relogin`, a 401 builds a fresh ApiClient for the next call:
    ServiceAccount tokens rotate.
    """

    def __init__(self, api_client: Any, *, timeout: Timeout = 10.0,
                 relogin: Callable[[], Any] | None = None) -> None:
        self.api_client = api_client
        self.timeout = timeout
        self._relogin = relogin

    # ---- verbs ------------------------------------------------------------------------------

    def get(self, path: str, *, timeout: Timeout | None = None, **query: Any) -> dict[str, Any]:
        return self.request("GET", path, query=query, timeout=timeout)

    def get_or_none(self, path: str, *, timeout: Timeout | None = None, **query: Any) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.get(path, timeout=timeout, **query)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: dict[str, Any], *, timeout: Timeout | None = None,
               **query: Any) -> dict[str, Any]:
        return self.request("POST", path, body=body, query=query, timeout=timeout)

    def replace(self, path: str, body: dict[str, Any], *, timeout: Timeout | None = None) -> dict[str, Any]:
        return self.request("PUT", path, body=body, timeout=timeout)

    def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH, *, timeout: Timeout | None = None,
              **query: Any) -> dict[str, Any]:
        return self.request("PATCH", path, body=body, content_type=content_type, query=query, timeout=timeout)

    def delete(self, path: str, body: dict[str, Any] | None = None, *,
               timeout: Timeout | None = None) -> dict[str, Any]:
        """`body` is a DeleteOptions: {"preconditions": {"resourceVersion": ...}} deletes exactly one version
        (409 when it changed), {"propagationPolicy": "Background"} chooses how dependents go."""
        return self.request("DELETE", path, body=body, timeout=timeout)

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = JSON, timeout: Timeout | None = None) -> dict[str, Any]:
        """One request; the decoded JSON answer, or ApiError."""
        response = self._send(method, path, query=query, body=body, content_type=content_type, timeout=timeout)
        try:
            raw = response.read()
        except Exception as exc:  # the connection broke while the body was read
            raise ApiError.no_answer(exc) from None
        if not 200 <= response.status < 300:
            raise self._failed(ApiError.from_answer(response.status, raw))
        return json.loads(raw) if raw else {}

    def watch(self, path: str, *, resource_version: str | None = None, timeout_seconds: int = 300,
              connect_timeout: float = 10.0, **query: Any) -> Iterator[dict[str, Any]]:
        """Watch events ({type, object}) until the server ends the stream after `timeout_seconds`.

        A silent, half-dead connection ends at the read timeout, a little after the server's own.
        """
        from kubernetes.watch.watch import iter_resp_lines

        response = self.open_watch(path, resource_version=resource_version, timeout_seconds=timeout_seconds,
                                   read_timeout=timeout_seconds + 15, connect_timeout=connect_timeout, **query)
        try:
            try:
                for line in iter_resp_lines(response):
                    if line:
                        yield json.loads(line)
            except Exception as exc:  # the stream broke
                raise ApiError.no_answer(exc) from None
        finally:
            response.close()
            response.release_conn()

    def open_watch(self, path: str, *, resource_version: str | None = None, timeout_seconds: int = 300,
                   read_timeout: float | None = None, connect_timeout: float = 10.0, **query: Any) -> Any:
        """The open urllib3 response of a watch, its body (one JSON event per line) unread; ApiError unless 2xx.
        For callers that read the stream themselves (and may shut its socket); others use `watch`.

        Bookmarks are asked for, so a quiet watch still advances its resourceVersion."""
        query = dict(query, watch="true", timeoutSeconds=timeout_seconds, allowWatchBookmarks="true")
        if resource_version is not None:
            query["resourceVersion"] = resource_version
        response = self._send("GET", path, query=query, body=None, content_type=JSON,
                              timeout=(connect_timeout, read_timeout))  # read None: no read timeout
        if not 200 <= response.status < 300:
            raise self._failed(ApiError.from_answer(response.status, response.read()))
        return response

    def close(self) -> None:
        """Drop pooled connections."""
        self.api_client.close()

    # ---- plumbing ---------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, query: dict[str, Any] | None, body: Any, content_type: str,
              timeout: Timeout | None) -> Any:
        from kubernetes import client

        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        method, url, headers, data, _ = self.api_client.param_serialize(
            method, path, query_params=params, header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            return self.api_client.call_api(method, url, headers, data,
                                            _request_timeout=self.timeout if timeout is None else timeout).response
        except client.ApiException as exc:
            raise self._failed(ApiError.from_answer(exc.status or 0, exc.body or b"", str(exc.reason))) from None
        except Exception as exc:  # urllib3's connection errors and timeouts
            raise ApiError.no_answer(exc) from None

    def _failed(self, error: ApiError) -> ApiError:
        if error.status == 401 and self._relogin is not None:
            self.api_client = self._relogin()
        return error
