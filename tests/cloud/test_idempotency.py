"""Idempotency-Key against 3 real MNs: retries anywhere get the first job, and nothing is done twice."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from tests.cloud.conftest import TOKEN, Api, CloudCluster
from zstack_devcluster.localnodes import LocalNode, wait_until
from zstack_devcluster.tcpproxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
HEADER = "Idempotency-Key"


@pytest.fixture
def three(cloud: CloudCluster) -> CloudCluster:
    cloud.start(3, env={"ZSTACK_JOB_PENDING_GRACE": "1", "ZSTACK_JOB_SWEEP_INTERVAL": "0.5"})
    cloud.wait_agreed()
    cloud.api().add_host(cpu=64, memory=65536)
    return cloud


def post(api: Api, path: str, body: dict | None, key: str) -> requests.Response:
    return api.request("POST", path, json=body, headers={HEADER: key})


def vms_named(cloud: CloudCluster, name: str) -> int:
    return cloud.sql("SELECT COUNT(*) AS n FROM vm_instances WHERE name = :n", n=name)[0].n


def test_a_retry_on_any_mn_gets_the_first_job_and_creates_one_vm(three: CloudCluster) -> None:
    key, body = uuid.uuid4().hex, {"name": "once", "cpu": 1, "memory": 64}
    first = post(Api(three.nodes[0].url), "/v1/vms", body, key)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    job = first.json()["job"]
    for node in three.nodes:
        again = post(Api(node.url), "/v1/vms", dict(body), key)
        assert again.status_code == 202, again.text
        assert again.json()["job"]["id"] == job["id"] and again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert three.api().wait(job["id"])["state"] == "Succeeded"
    replay = post(three.api(), "/v1/vms", body, key).json()["job"]
    assert replay["state"] == "Succeeded" and replay["id"] == job["id"]
    assert vms_named(three, "once") == 1


def test_the_same_key_for_another_request_is_a_422_naming_the_header(three: CloudCluster) -> None:
    key = uuid.uuid4().hex
    assert post(three.api(), "/v1/vms", {"name": "a", "cpu": 1, "memory": 64}, key).status_code == 202
    for path, body in (("/v1/vms", {"name": "b", "cpu": 1, "memory": 64}), ("/v1/hosts", {"name": "a", "cpu": 1,
                                                                                           "memory": 64})):
        response = post(three.api(), path, body, key)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == HEADER
    for bad in ("", "x" * 256, "caf\u00e9", "with space"):
        response = three.api().request("POST", "/v1/vms", json={"name": "c", "cpu": 1, "memory": 64},
                                       headers={HEADER: bad.encode().decode("latin-1")})
        assert response.status_code == 400 and response.json()["error"]["field"] == HEADER, bad


def test_concurrent_requests_with_one_key_make_one_job(three: CloudCluster) -> None:
    key, body = uuid.uuid4().hex, {"name": "racing", "cpu": 1, "memory": 64}
    barrier = threading.Barrier(12)

    def send(n: int) -> tuple[int, str]:
        api = Api(three.nodes[n % 3].url)
        barrier.wait(10)
        response = post(api, "/v1/vms", body, key)
        return response.status_code, response.json()["job"]["id"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(12)))
    assert {status for status, _ in answers} == {202}
    assert len({job for _, job in answers}) == 1, answers
    assert three.api().wait(answers[0][1])["state"] == "Succeeded"
    assert vms_named(three, "racing") == 1


def test_a_delete_retried_with_its_key_destroys_once(three: CloudCluster) -> None:
    vm = three.api().run("POST", "/v1/vms", {"name": "doomed", "cpu": 1, "memory": 64})["result"]
    key = uuid.uuid4().hex
    first = three.api().request("DELETE", f"/v1/vms/{vm['uuid']}", headers={HEADER: key})
    assert first.status_code == 202
    assert three.api().wait(first.json()["job"]["id"])["state"] == "Succeeded"
    again = three.api().request("DELETE", f"/v1/vms/{vm['uuid']}", headers={HEADER: key})
    assert again.status_code == 202 and again.json()["job"]["id"] == first.json()["job"]["id"]
    without_key = three.api().request("DELETE", f"/v1/vms/{vm['uuid']}")
    assert without_key.status_code == 409  # a new request: the VM is destroyed already
    destroys = three.sql("SELECT COUNT(*) AS n FROM vm_history WHERE vm_uuid = :u AND to_state = 'Destroyed'",
                         u=vm["uuid"])
    assert destroys[0].n == 1


def test_a_retry_after_the_mn_that_took_the_post_was_killed_gets_its_job(three: CloudCluster) -> None:
    """The MN stores the key with the job, then dies before it answers (its broker stops confirming, so it
    waits): the client's retry on another MN must get that job, and the job must still run exactly once."""
    broker = TcpProxy(_address(three.broker_url))
    host, port = broker.address
    credentials = urlsplit(three.broker_url).netloc.rpartition("@")[0]
    victim = LocalNode("victim", urlsplit(three.broker_url)._replace(netloc=f"{credentials}@{host}:{port}").geturl(),
                       three.database_url, three.workdir, env={**three.node_env(), "ZSTACK_API_TOKEN": TOKEN,
                                                                "ZSTACK_SIM_LATENCY": "0.002"}).start()
    three.nodes.append(victim)
    victim.wait_ready(60)
    three.wait_agreed()
    key, body = uuid.uuid4().hex, {"name": "orphan", "cpu": 1, "memory": 64}
    outcome: dict[str, object] = {}

    def first_attempt() -> None:
        try:
            outcome["status"] = post(Api(victim.url), "/v1/vms", body, key).status_code
        except requests.RequestException as exc:
            outcome["error"] = exc

    broker.cut()
    client = threading.Thread(target=first_attempt, daemon=True)
    client.start()
    stored = wait_until(lambda: three.sql("SELECT job_id FROM idempotency_keys WHERE key = :k", k=key), 10,
                        "the victim to store the key with its job", interval=0.01)
    victim.kill()
    client.join(30)
    broker.close()
    assert "status" not in outcome, f"the victim answered {outcome} before it died"
    retry = post(Api(three.nodes[0].url), "/v1/vms", body, key)
    assert retry.status_code == 202, retry.text
    job = retry.json()["job"]
    assert job["id"] == stored[0].job_id and retry.headers["Idempotent-Replayed"] == "true"
    assert three.api().wait(job["id"], timeout=60)["state"] == "Succeeded"
    assert vms_named(three, "orphan") == 1


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672
