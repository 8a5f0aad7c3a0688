"""The pure parts of the Kubernetes client layer: paths, errors and time stamps."""

from __future__ import annotations

import json

import pytest

from zstack_kube.errors import ApiError, KubeError, describe, status_of
from zstack_kube.paths import api_path
from zstack_kube.times import micro_time, now, parse_time, to_rfc3339


@pytest.mark.parametrize(("args", "path"), [
    (("v1", "pods", "ns"), "/api/v1/namespaces/ns/pods"),
    (("v1", "pods", "ns", "p", "status"), "/api/v1/namespaces/ns/pods/p/status"),
    (("coordination.k8s.io/v1", "leases", "ns", "mn-0"), "/apis/coordination.k8s.io/v1/namespaces/ns/leases/mn-0"),
    (("v1", "nodes", None, "n1"), "/api/v1/nodes/n1"),
    (("v1", "pods", "a b", "x/y"), "/api/v1/namespaces/a%20b/pods/x/y"),
])
def test_paths_of_core_and_group_apis(args: tuple, path: str) -> None:
    assert api_path(*args) == path


def test_an_answer_with_a_status_object_keeps_the_servers_words() -> None:
    body = json.dumps({"kind": "Status", "reason": "Forbidden",
                       "message": 'leases "x" is forbidden: User "u" cannot update'}).encode()
    error = ApiError.from_answer(403, body)
    assert (error.status, error.reason) == (403, "Forbidden")
    assert str(error) == '403 Forbidden: leases "x" is forbidden: User "u" cannot update'
    assert not error.transient and isinstance(error, KubeError)


def test_an_answer_without_json_keeps_its_text_or_the_fallback() -> None:
    assert ApiError.from_answer(502, b"<html>bad gateway</html>").message == "<html>bad gateway</html>"
    assert ApiError.from_answer(500, b"", "Internal Server Error").message == "Internal Server Error"
    assert ApiError.from_answer(503, b"x").transient


def test_no_answer_is_status_0_with_the_cause_in_one_line() -> None:
    class MaxRetryError(Exception):  # urllib3's shape: the real cause in `reason`
        def __init__(self) -> None:
            super().__init__("Max retries exceeded with url: /api (Caused by ...)")
            self.reason = ConnectionRefusedError("[Errno 111] Connection refused\nsecond line")

    error = ApiError.no_answer(MaxRetryError())
    assert error.status == 0 and error.transient
    assert str(error) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_status_of_and_describe_any_failure() -> None:
    answered = ApiError(404, 'leases "x" not found', "NotFound")
    assert (status_of(answered), describe(answered)) == (404, '404 NotFound: leases "x" not found')
    assert status_of(ApiError(0, "TimeoutError: timed out")) is None  # no answer
    assert status_of(KeyError("uid")) is None and describe(KeyError("uid")) == "KeyError: 'uid'"


def test_time_stamps_round_trip() -> None:
    assert to_rfc3339(0) == "1970-01-01T00:00:00Z"
    assert parse_time("1970-01-01T00:00:01.500000Z") == 1.5
    assert abs(parse_time(micro_time()) - parse_time(now())) < 2
