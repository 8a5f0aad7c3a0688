"""Bad input against a real MN: every case is a 4xx naming the field, never a 5xx."""

from __future__ import annotations

import uuid

import pytest

from tests.cloud.conftest import Api

pytestmark = pytest.mark.slow


@pytest.fixture
def one_mn(cloud):
    cloud.start(1)
    return cloud


def error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    return body["error"]


def test_auth_is_required_on_the_cloud_routes_only(one_mn):
    node = one_mn.nodes[0]
    anonymous, wrong = Api(node.url, token=None), Api(node.url, token="wrong")
    for client in (anonymous, wrong):
        for method, path in [("GET", "/v1/hosts"), ("GET", "/v1/vms"), ("GET", f"/v1/jobs/{'0' * 32}"),
                             ("POST", "/v1/vms")]:
            response = client.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert error(response)["code"] == "unauthorized"
    for path in ("/healthz", "/readyz", "/metrics", "/v1/cluster/ring", "/v1/openapi.json"):
        assert anonymous.request("GET", path).status_code == 200, path
    assert anonymous.request("GET", "/v1/openapi.json").json()["openapi"].startswith("3.")


def test_an_mn_without_a_token_says_how_to_set_one(cloud):
    (node,) = cloud.start(1, env={"ZSTACK_API_TOKEN": ""})
    response = Api(node.url).request("GET", "/v1/hosts")
    assert response.status_code == 401
    assert "ZSTACK_API_TOKEN" in error(response)["message"]


def test_bad_bodies_are_400_naming_the_field(one_mn):
    api = one_mn.api()
    cases = [
        ({"name": "h", "cpu": "8", "memory": 1}, "wrong_type", "cpu"),
        ({"name": "h", "cpu": 8, "memory": 1, "disk": 5}, "unknown_field", "disk"),
        ({"name": "h", "cpu": 8, "memory": 1, "uuid": "not-a-uuid"}, "bad_uuid", "uuid"),
        ({"name": "h", "cpu": 0, "memory": 1}, "out_of_range", "cpu"),
        ({"name": "h", "cpu": 1}, "missing_field", "memory"),
        ([], "wrong_type", None),
    ]
    for body, code, field in cases:
        response = api.request("POST", "/v1/hosts", json=body)
        assert response.status_code == 400, (body, response.text)
        got = error(response)
        assert (got["code"], got["field"]) == (code, field), got
        if field:
            assert field in got["message"]
    response = api.request("POST", "/v1/hosts", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and error(response)["code"] == "bad_json"
    response = api.request("POST", "/v1/hosts", data=b"name=h", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    response = api.request("POST", "/v1/hosts", json={"name": "x" * (70 * 1024), "cpu": 1, "memory": 1})
    assert response.status_code == 413 and error(response)["code"] == "body_too_large"
    response = api.request("POST", f"/v1/vms/{'a' * 32}/actions/start", json={"force": True})
    assert response.status_code == 400 and error(response)["field"] == "force"


def test_bad_paths_and_queries(one_mn):
    api = one_mn.api()
    for path in ("/v1/hosts/ABC", f"/v1/vms/{uuid.uuid4()}", "/v1/jobs/123"):
        response = api.request("GET", path)
        assert response.status_code == 400 and error(response)["code"] == "bad_uuid", path
    missing = "f" * 32
    for method, path in [("GET", f"/v1/hosts/{missing}"), ("GET", f"/v1/vms/{missing}"),
                         ("GET", f"/v1/jobs/{missing}"), ("DELETE", f"/v1/hosts/{missing}"),
                         ("POST", f"/v1/vms/{missing}/actions/stop"), ("DELETE", f"/v1/vms/{missing}")]:
        response = api.request(method, path)
        assert response.status_code == 404 and error(response)["code"] == "not_found", (method, path)
    assert api.request("GET", "/v1/nothing").status_code == 404
    response = api.request("PUT", "/v1/hosts")
    assert response.status_code == 405 and error(response)["code"] == "method_not_allowed"
    for query, field in [("wait=abc", "wait"), ("wait=61", "wait"), ("bogus=1", "bogus")]:
        response = api.request("GET", f"/v1/jobs/{missing}?{query}")
        assert response.status_code == 400 and error(response)["field"] == field, query
    response = api.request("GET", "/v1/vms?state=Flying")
    assert response.status_code == 400 and error(response)["field"] == "state"
    response = api.request("POST", "/v1/vms", json={"name": "v", "cpu": 1, "memory": 1, "host_uuid": missing})
    assert response.status_code == 404 and error(response)["field"] == "host_uuid"


def test_invalid_transitions_are_409_or_failed_jobs(one_mn):
    api = one_mn.api()
    host = api.add_host(cpu=4, memory=4096)
    vm = api.run("POST", "/v1/vms", {"name": "v", "cpu": 1, "memory": 512})["result"]
    response = api.request("POST", f"/v1/vms/{vm['uuid']}/actions/start")
    assert response.status_code == 409 and error(response)["code"] == "invalid_state"
    assert "Running" in error(response)["message"]
    response = api.request("DELETE", f"/v1/hosts/{host['uuid']}")
    assert response.status_code == 409 and error(response)["code"] == "host_has_vms"
    response = api.request("POST", "/v1/hosts", json={"name": "dup", "cpu": 1, "memory": 1, "uuid": host["uuid"]})
    assert response.status_code == 409 and error(response)["code"] == "already_exists"
    # Queued behind a stop, a second stop is accepted (its validity depends on the queue) and then fails.
    first = api.submit("POST", f"/v1/vms/{vm['uuid']}/actions/stop")
    second = api.submit("POST", f"/v1/vms/{vm['uuid']}/actions/stop")
    assert api.wait(first["id"])["state"] == "Succeeded"
    failed = api.wait(second["id"])
    assert failed["state"] == "Failed" and failed["error"]["code"] == "invalid_state", failed
    # No room: the create job fails with a clear code and leaves no capacity behind.
    big = api.run("POST", "/v1/vms", {"name": "big", "cpu": 64, "memory": 1})
    assert big["state"] == "Failed" and big["error"]["code"] == "no_capacity", big
    assert api.ok("GET", f"/v1/hosts/{host['uuid']}", 200)["cpu_used"] == 1
    jobs = api.ok("GET", f"/v1/jobs?resource_uuid={vm['uuid']}&limit=10", 200)["jobs"]
    assert [j["operation"] for j in jobs] == ["vm.stop", "vm.stop", "vm.create"]


def test_metrics_count_requests_and_jobs(one_mn):
    api = one_mn.api()
    api.add_host()
    api.request("GET", "/v1/hosts/zz")
    text = api.request("GET", "/metrics").text
    assert 'zstack_api_requests_total{code="202",operation="host.add"} 1.0' in text
    assert 'zstack_api_requests_total{code="400",operation="hosts.get"} 1.0' in text
    assert 'zstack_job_seconds_count{operation="host.add"} 1.0' in text
    assert "zstack_jobs_in_flight 0.0" in text


def test_text_the_database_cannot_store_is_400_naming_the_field(one_mn):
    """UUIDs with a trailing newline, NUL characters, lone surrogates: in path, query or body, a 400."""
    api = one_mn.api()
    good = "a" * 32
    for path, field in [(f"/v1/vms/{good}%0A", "uuid"), (f"/v1/hosts/{good}%00", "uuid"),
                        (f"/v1/jobs/%ED%A0%80{good[:29]}", "id"), (f"/v1/vms?host_uuid={good}%0A", "host_uuid"),
                        ("/v1/vms?state=Running%00", "state"), ("/v1/jobs?resource_uuid=%ED%A0%80", "resource_uuid")]:
        response = api.request("GET", path)
        assert response.status_code == 400 and error(response)["field"] == field, (path, response.text)
    newline = f'"{good}\\n"'
    for path, raw, field in [
        ("/v1/hosts", '{"name": "h\\u0000", "cpu": 1, "memory": 1}', "name"),
        ("/v1/hosts", '{"name": "h\\ud800", "cpu": 1, "memory": 1}', "name"),
        ("/v1/hosts", f'{{"name": "h", "cpu": 1, "memory": 1, "uuid": {newline}}}', "uuid"),
        ("/v1/vms", '{"name": "\\udc00v", "cpu": 1, "memory": 1}', "name"),
        ("/v1/vms", f'{{"name": "v", "cpu": 1, "memory": 1, "host_uuid": {newline}}}', "host_uuid"),
        (f"/v1/vms/{good}/actions/migrate", f'{{"host_uuid": {newline}}}', "host_uuid"),
        (f"/v1/vms/{good}/actions/start", '{"\\ud800": 1}', "\ud800"),
    ]:
        response = api.request("POST", path, data=raw.encode(), headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and error(response)["field"] == field, (raw, response.text)
    assert api.ok("GET", "/v1/jobs", 200)["jobs"] == [], "no job was accepted"
