"""POST /v1/hosts/{uuid}/actions/ping: a synchronous bus call to the MN that tracks the host, on real MNs."""

from __future__ import annotations

import signal
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cloud.conftest import Api, CloudCluster
from zstack_devcluster.localnodes import LocalNode, wait_until
from zstack_node.ring import Ring

pytestmark = pytest.mark.slow

PING = "/v1/hosts/{}/actions/ping"


def add_host_owned_by(cloud: CloudCluster, ring: Ring, mn_uuid: str) -> dict:
    """A new host whose UUID the ring gives to `mn_uuid`."""
    host_uuid = next(u for u in iter(lambda: uuid.uuid4().hex, None) if ring.owner(u) == mn_uuid)
    job = cloud.api().run("POST", "/v1/hosts", {"name": f"h-{host_uuid[:6]}", "cpu": 8, "memory": 8192,
                                                "uuid": host_uuid})
    assert job["state"] == "Succeeded", job
    return job["result"]


def ping(node: LocalNode, host_uuid: str, expect: int = 200) -> dict:
    return Api(node.url).ok("POST", PING.format(host_uuid), expect)


def host_calls(node: LocalNode) -> float:
    """zstack_bus_call_seconds_count{service="host"} on one MN: the bus calls it made to the host service."""
    return sum(s.value for f in text_string_to_metric_families(node.text("/metrics")) for s in f.samples
               if s.name == "zstack_bus_call_seconds_count" and s.labels.get("service") == "host")


def test_a_ping_through_any_mn_is_answered_by_the_mn_that_tracks_the_host(cloud):
    nodes = cloud.start(3)
    ring = Ring.of(cloud.wait_agreed({n.uuid for n in nodes}))
    hosts = [add_host_owned_by(cloud, ring, n.uuid) for n in nodes for _ in range(2)]
    # The tracker stamps every host it pings: that MN is the one the ping must reach.
    wait_until(lambda: all(r.tracked_by for r in cloud.sql("SELECT tracked_by FROM hosts")), 30,
               "the trackers to ping every host")
    tracker = {r.uuid: r.tracked_by for r in cloud.sql("SELECT uuid, tracked_by FROM hosts")}
    before = {n.name: host_calls(n) for n in nodes}
    for node in nodes:
        for host in hosts:
            answer = ping(node, host["uuid"])
            owner = node.get(f"/v1/cluster/owner/{host['uuid']}")["owner"]
            assert answer["tracked_by"] == owner == tracker[host["uuid"]], (node.name, answer)
            assert (answer["uuid"], answer["reachable"], answer["error"]) == (host["uuid"], True, None), answer
            assert answer["seconds"] >= 0
    # Every MN made one host call per ping it received, whichever MN owned the host.
    assert {n.name: host_calls(n) - before[n.name] for n in nodes} == {n.name: len(hosts) for n in nodes}


def test_an_unreachable_host_answers_reachable_false_and_the_ping_changes_nothing(cloud):
    # The tracker pings only when MNs join or leave: the hosts' state and stamps are the manual pings' to change.
    nodes = cloud.start(2, env={"ZSTACK_HOST_PING_INTERVAL": "3600"})
    ring = Ring.of(cloud.wait_agreed({n.uuid for n in nodes}))
    host = add_host_owned_by(cloud, ring, nodes[1].uuid)
    cloud.sql("INSERT INTO sim_host_faults (host_uuid) VALUES (:u)", u=host["uuid"])
    for _ in range(3):  # as many failures in a row as the tracker takes to disconnect a host
        for node in nodes:
            answer = ping(node, host["uuid"])
            assert (answer["reachable"], answer["tracked_by"]) == (False, nodes[1].uuid), answer
            assert host["uuid"] in answer["error"] and "did not answer" in answer["error"], answer
    row = Api(nodes[0].url).ok("GET", f"/v1/hosts/{host['uuid']}", 200)
    assert (row["state"], row["version"]) == ("Connected", host["version"]), "a ping is a read"
    assert cloud.sql("SELECT last_ping_at, tracked_by FROM hosts WHERE uuid = :u", u=host["uuid"]) == [(None, None)]
    cloud.sql("DELETE FROM sim_host_faults")
    assert ping(nodes[0], host["uuid"])["reachable"] is True


def test_an_owner_that_does_not_answer_is_503_naming_it_and_retry_works(cloud):
    # A frozen owner stays in the ring (long heartbeat timeout), so the call times out instead of moving.
    nodes = cloud.start(2, env={"ZSTACK_CALL_TIMEOUT": "2", "ZSTACK_HEARTBEAT_TIMEOUT": "60"})
    ring = Ring.of(cloud.wait_agreed({n.uuid for n in nodes}))
    receiver, owner = nodes
    host = add_host_owned_by(cloud, ring, owner.uuid)
    owner.signal(signal.SIGSTOP)
    try:
        response = Api(receiver.url).request("POST", PING.format(host["uuid"]))
    finally:
        owner.signal(signal.SIGCONT)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "Timeout" in error["message"], error
    assert owner.uuid in error["message"] and "retry" in error["message"], error
    assert ping(receiver, host["uuid"])["tracked_by"] == owner.uuid


def test_bad_requests_are_refused_and_the_route_is_documented(cloud):
    (node,) = cloud.start(1)
    api = Api(node.url)
    host = api.add_host()
    missing = uuid.uuid4().hex
    response = api.request("POST", PING.format(missing))
    assert response.status_code == 404 and missing in response.json()["error"]["message"], response.text
    response = api.request("POST", PING.format("not-a-uuid"))
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_uuid", response.text
    response = api.request("POST", PING.format(host["uuid"]), json={"force": True})
    assert response.status_code == 400 and response.json()["error"]["field"] == "force", response.text
    for token in (None, "wrong"):
        response = Api(node.url, token=token).request("POST", PING.format(host["uuid"]))
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", response.text
    document = Api(node.url, token=None).ok("GET", "/v1/openapi.json", 200)
    operation = document["paths"]["/v1/hosts/{uuid}/actions/ping"]["post"]
    assert operation["operationId"] == "pingHost" and operation["security"] == [{"bearer": []}]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HostPing"}
    assert set(document["components"]["schemas"]["HostPing"]["required"]) == {
        "uuid", "reachable", "error", "tracked_by", "seconds"}
    assert {"404", "503"} <= set(operation["responses"])
