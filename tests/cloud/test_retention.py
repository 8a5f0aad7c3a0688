"""Retention and bounded waits against 3 real MNs: purges by ring owner, and a cap on long polls."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.cloud.conftest import CloudCluster
from zstack_devcluster.localnodes import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RETENTION = {"ZSTACK_JOB_RETENTION": "4", "ZSTACK_IDEMPOTENCY_RETENTION": "4", "ZSTACK_PURGE_INTERVAL": "0.5",
             "ZSTACK_PURGE_BATCH": "7"}


def purged(node_url: str) -> dict[str, float]:
    text = requests.get(node_url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r'^zstack_retention_purged_total\{kind="(\w+)"\} (\S+)$',
                                                    text, re.M)}


def test_ended_jobs_destroyed_vms_and_keys_are_purged_each_by_its_owner(cloud: CloudCluster) -> None:
    nodes = cloud.start(3, env=RETENTION)
    cloud.wait_agreed()
    api = cloud.api()
    api.add_host(cpu=64, memory=65536)
    kept = api.run("POST", "/v1/vms", {"name": "kept", "cpu": 1, "memory": 64})["result"]
    gone = []
    for n in range(20):
        vm = api.run("POST", "/v1/vms", {"name": f"gone-{n}", "cpu": 1, "memory": 64})["result"]
        job = api.request("DELETE", f"/v1/vms/{vm['uuid']}", headers={"Idempotency-Key": uuid.uuid4().hex})
        assert api.wait(job.json()["job"]["id"])["state"] == "Succeeded"
        gone.append(vm["uuid"])
    owners = {u: api.ok("GET", f"/v1/cluster/owner/{u}", 200)["owner"] for u in gone}

    def all_purged() -> bool:
        return not cloud.sql("SELECT uuid FROM vm_instances WHERE uuid = ANY(:u)", u=gone) and not cloud.sql(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL") and not cloud.sql("SELECT key FROM idempotency_keys")

    wait_until(all_purged, 60, "every ended job, destroyed VM and key to be purged", interval=0.5)
    assert cloud.sql("SELECT uuid, state FROM vm_instances WHERE uuid = :u", u=kept["uuid"])[0].state == "Running"
    assert not cloud.sql("SELECT vm_uuid FROM vm_history WHERE vm_uuid = ANY(:u)", u=gone)
    by_node = {node.uuid: purged(node.url) for node in nodes}
    for node_uuid, counts in by_node.items():
        assert counts["vm"] == sum(owner == node_uuid for owner in owners.values()), (node_uuid, by_node, owners)
    assert sum(c["job"] for c in by_node.values()) == 42  # 1 host, 21 creates and 20 destroys: each purged once
    assert sum(c["idempotency_key"] for c in by_node.values()) == 20
    assert api.ok("GET", f"/v1/vms/{kept['uuid']}", 200)["state"] == "Running"


def test_unfinished_jobs_are_never_purged(cloud: CloudCluster) -> None:
    (node,) = cloud.start(1, env={**RETENTION, "ZSTACK_SIM_LATENCY": "10"})
    api = cloud.api()
    job = api.submit("POST", "/v1/hosts", {"name": "slow", "cpu": 8, "memory": 1024})
    wait_until(lambda: cloud.sql("SELECT 1 FROM jobs WHERE id = :j AND state = 'Running'"
                                 " AND created_at < clock_timestamp() - interval '5 seconds'", j=job["id"]),
               60, "the running job to outlive the retention")
    assert purged(node.url)["job"] == 0
    assert api.wait(job["id"])["state"] == "Succeeded"


def test_long_polls_over_the_cap_get_429_with_retry_after(cloud: CloudCluster) -> None:
    (node,) = cloud.start(1, env={"ZSTACK_API_MAX_LONG_POLLS": "3", "ZSTACK_SIM_LATENCY": "5"})
    api = cloud.api(node)
    job = api.submit("POST", "/v1/hosts", {"name": "slow", "cpu": 8, "memory": 1024})
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(api.request, "GET", f"/v1/jobs/{job['id']}?wait=30") for _ in range(3)]
        wait_until(lambda: re.search(r"^zstack_api_long_polls 3\.0$", requests.get(node.url + "/metrics",
                                                                                 timeout=10).text, re.M),
                   20, "3 requests to wait")
        refused = api.request("GET", f"/v1/jobs/{job['id']}?wait=30")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["field"] == "wait"
        assert api.request("GET", f"/v1/jobs/{job['id']}").status_code == 200  # no wait: always answered
        assert all(w.result().json()["state"] == "Succeeded" for w in waiting)
