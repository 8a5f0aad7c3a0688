"""zstack_kube's Client over a kubernetes ApiClient whose network is faked: what it sends (method, path,
query, body, content type, timeout), how answers become dicts or ApiError, the 401 re-login, and watches."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client as k8s

from zstack_kube.client import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, Client
from zstack_kube.errors import ApiError


class FakeResponse:
    """The urllib3 response that ApiClient.call_api wraps: a status and a body (read at once or streamed)."""

    def __init__(self, status: int, body: Any = b"", chunks: list[bytes] | None = None) -> None:
        self.status = status
        self.body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.chunks = chunks or []
        self.closed = self.released = False

    def read(self) -> bytes:
        return self.body

    def stream(self, amt: Any = None, decode_content: Any = None) -> Any:
        yield from self.chunks

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        self.released = True


class FakeApiClient(k8s.ApiClient):
    """A real ApiClient (its URL, query and header serialization) that answers from `answers` and records
    each call as (method, url, headers, body, timeout)."""

    def __init__(self, *answers: FakeResponse | Exception) -> None:
        cfg = k8s.Configuration(host="https://api.test:6443")
        cfg.api_key = {"authorization": "Bearer t0k3n"}  # as load_kube_config sets it
        super().__init__(configuration=cfg)
        self.answers = list(answers)
        self.calls: list[tuple[str, str, dict[str, str], Any, Any]] = []

    def call_api(self, method: str, url: str, header_params: Any = None, body: Any = None,
                 post_params: Any = None, _request_timeout: Any = None) -> Any:
        self.calls.append((method, url, header_params, body, _request_timeout))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(response=answer)


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


def test_a_get_sends_the_query_without_none_values_and_returns_the_dict() -> None:
    api = FakeApiClient(FakeResponse(200, {"items": [], "metadata": {"resourceVersion": "7"}}))
    answer = Client(api, timeout=3.0).get("/api/v1/namespaces/ns/pods", labelSelector="app=x", limit=None)
    assert answer == {"items": [], "metadata": {"resourceVersion": "7"}}
    method, url, headers, body, timeout = api.calls[0]
    assert (method, url, body, timeout) == ("GET", "https://api.test:6443/api/v1/namespaces/ns/pods"
                                            "?labelSelector=app%3Dx", None, 3.0)
    assert headers["authorization"] == "Bearer t0k3n" and headers["Accept"] == "application/json"


def test_a_call_may_give_its_own_timeout_a_total_or_connect_and_read() -> None:
    api = FakeApiClient(FakeResponse(200, {}), FakeResponse(200, {}))
    kube = Client(api, timeout=10.0)
    kube.get("/api/v1/nodes", timeout=0.5)
    kube.get("/api/v1/nodes", timeout=(1.0, 4.0))
    assert [call[4] for call in api.calls] == [0.5, (1.0, 4.0)]


@pytest.mark.parametrize(("content_type", "patch"), [
    (MERGE_PATCH, {"metadata": {"labels": {"a": "b"}}}),
    (JSON_PATCH, [{"op": "add", "path": "/status", "value": {}}]),
    (APPLY_PATCH, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}}),
])
def test_a_patch_sends_its_content_type_and_body(content_type: str, patch: Any) -> None:
    api = FakeApiClient(FakeResponse(200, {"kind": "ConfigMap"}))
    Client(api).patch("/api/v1/namespaces/ns/configmaps/c", patch, content_type, fieldManager="m", force="true")
    method, url, headers, body, _ = api.calls[0]
    assert method == "PATCH" and url.endswith("/configmaps/c?fieldManager=m&force=true")
    assert headers["Content-Type"] == content_type and body == patch


def test_create_replace_and_delete_use_their_verbs_and_bodies() -> None:
    api = FakeApiClient(FakeResponse(201, {"a": 1}), FakeResponse(200, {"a": 2}), FakeResponse(200, b""))
    kube = Client(api)
    assert kube.create("/api/v1/namespaces/ns/configmaps", {"a": 0}) == {"a": 1}
    assert kube.replace("/api/v1/namespaces/ns/configmaps/c", {"a": 1}) == {"a": 2}
    options = {"preconditions": {"resourceVersion": "9"}, "propagationPolicy": "Background"}
    assert kube.delete("/api/v1/namespaces/ns/configmaps/c", options) == {}  # an empty answer is {}
    assert [(c[0], c[3]) for c in api.calls] == [("POST", {"a": 0}), ("PUT", {"a": 1}), ("DELETE", options)]


def test_a_non_2xx_answer_is_an_api_error_with_the_servers_words() -> None:
    api = FakeApiClient(FakeResponse(409, status_body(409, "Conflict", "the object has been modified")))
    with pytest.raises(ApiError) as caught:
        Client(api).replace("/api/v1/namespaces/ns/configmaps/c", {})
    assert (caught.value.status, caught.value.reason) == (409, "Conflict")
    assert caught.value.message == "the object has been modified"


def test_get_or_none_is_none_on_404_and_raises_otherwise() -> None:
    api = FakeApiClient(FakeResponse(404, status_body(404, "NotFound", 'pods "p" not found')),
                        FakeResponse(403, status_body(403, "Forbidden", "no")))
    kube = Client(api)
    assert kube.get_or_none("/api/v1/namespaces/ns/pods/p") is None
    with pytest.raises(ApiError) as caught:
        kube.get_or_none("/api/v1/namespaces/ns/pods/p")
    assert caught.value.status == 403


def test_no_answer_is_status_0() -> None:
    api = FakeApiClient(ConnectionRefusedError("[Errno 111] Connection refused"),
                        k8s.ApiException(status=0, reason="SSLError: certificate verify failed"))
    kube = Client(api)
    for _ in range(2):
        with pytest.raises(ApiError) as caught:
            kube.get("/api/v1/nodes")
        assert caught.value.status == 0 and caught.value.transient
    assert str(caught.value) == "SSLError: certificate verify failed"


def test_a_401_logs_in_again_for_the_next_call() -> None:
    first = FakeApiClient(FakeResponse(401, status_body(401, "Unauthorized", "Unauthorized")))
    second = FakeApiClient(FakeResponse(200, {"ok": True}))
    logins = [second]
    kube = Client(first, relogin=logins.pop)
    with pytest.raises(ApiError) as caught:
        kube.get("/api/v1/nodes")
    assert caught.value.status == 401 and kube.api_client is second
    assert kube.get("/api/v1/nodes") == {"ok": True}


def test_a_401_without_relogin_keeps_the_client() -> None:
    api = FakeApiClient(FakeResponse(401, b"Unauthorized"))
    kube = Client(api)
    with pytest.raises(ApiError):
        kube.get("/api/v1/nodes")
    assert kube.api_client is api


def test_a_watch_yields_events_across_chunks_and_resumes_from_a_version() -> None:
    events = [{"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "11"}}},
              {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}]
    raw = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    answer = FakeResponse(200, chunks=[raw[:15], raw[15:70], raw[70:]])
    api = FakeApiClient(answer)
    got = list(Client(api).watch("/apis/coordination.k8s.io/v1/namespaces/ns/leases", resource_version="10",
                                 timeout_seconds=60, connect_timeout=2.0, labelSelector="x=y"))
    assert got == events and answer.closed and answer.released
    method, url, _, _, timeout = api.calls[0]
    assert method == "GET" and timeout == (2.0, 75)  # the read timeout a little after the server's own
    query = url.split("?", 1)[1].split("&")
    assert set(query) == {"labelSelector=x%3Dy", "watch=true", "timeoutSeconds=60", "allowWatchBookmarks=true",
                          "resourceVersion=10"}


def test_a_watch_that_is_refused_raises_at_once() -> None:
    api = FakeApiClient(FakeResponse(410, status_body(410, "Expired", "too old resource version")))
    with pytest.raises(ApiError) as caught:
        next(Client(api).watch("/api/v1/pods", resource_version="1"))
    assert caught.value.status == 410
