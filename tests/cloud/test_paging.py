"""Paging of every list against 3 real MNs: limits, opaque continue tokens, filters, and a walk under churn."""

from __future__ import annotations

import random
import threading
import uuid

import pytest

from tests.cloud.conftest import CloudCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def three(cloud: CloudCluster) -> CloudCluster:
    cloud.start(3)
    cloud.wait_agreed()
    return cloud


def seed_vms(cloud: CloudCluster, count: int, state: str = "Stopped", host: str | None = None) -> list[str]:
    """VM rows written straight into the database (paging reads rows; how they got there does not matter)."""
    uuids = [uuid.uuid4().hex for _ in range(count)]
    cloud.sql("INSERT INTO vm_instances (uuid, name, cpu, memory, host_uuid, state)"
              " SELECT u, 'seeded-' || u, 1, 64, :h, :s FROM unnest(CAST(:u AS varchar[])) AS u",
              u=uuids, h=host, s=state)
    return uuids


def walk(cloud: CloudCluster, path: str, kind: str, **query: object) -> list[dict]:
    """Every page of a list, each page from a random MN; the rows in order."""
    rows: list[dict] = []
    token = None
    while True:
        params = {**query, **({"continue": token} if token else {})}
        page = cloud.api().ok("GET", path, 200, params=params)
        rows += page[kind]
        token = page.get("continue")
        if token is None:
            return rows
        assert page[kind], "a page that says more remain is never empty"


def test_lists_page_by_limit_with_a_default_of_100_and_a_maximum_of_1000(three: CloudCluster) -> None:
    seed_vms(three, 150)
    api = three.api()
    first = api.ok("GET", "/v1/vms", 200)
    assert len(first["vms"]) == 100 and first["continue"]
    rest = api.ok("GET", "/v1/vms", 200, params={"continue": first["continue"]})
    assert len(rest["vms"]) == 50 and "continue" not in rest
    assert [v["uuid"] for v in first["vms"] + rest["vms"]] == sorted(v["uuid"] for v in first["vms"] + rest["vms"])
    assert len(api.ok("GET", "/v1/vms", 200, params={"limit": 1000})["vms"]) == 150
    for path in ("/v1/vms", "/v1/hosts", "/v1/jobs"):
        for bad in ("1001", "0", "-1", "1_0", "\u0665", "10.5"):
            response = api.request("GET", path, params={"limit": bad})
            assert response.status_code == 400, (path, bad, response.text)
            assert response.json()["error"]["field"] == "limit"


def test_a_walk_during_inserts_and_deletes_sees_every_lasting_row_exactly_once(three: CloudCluster) -> None:
    lasting = set(seed_vms(three, 600))
    doomed = seed_vms(three, 300)
    stop = threading.Event()
    churn = random.Random(random.random())

    def churn_rows() -> None:
        while not stop.is_set():
            seed_vms(three, 5)
            victims = [doomed.pop(churn.randrange(len(doomed))) for _ in range(min(5, len(doomed)))]
            three.sql("DELETE FROM vm_instances WHERE uuid = ANY(:u)", u=victims)

    thread = threading.Thread(target=churn_rows, daemon=True)
    thread.start()
    try:
        rows = walk(three, "/v1/vms", "vms", limit=37)
    finally:
        stop.set()
        thread.join(10)
    seen = [r["uuid"] for r in rows]
    assert len(seen) == len(set(seen)), "a row came twice"
    assert lasting <= set(seen), f"{len(lasting - set(seen))} rows that existed throughout were skipped"


def test_filters_combine_with_paging_and_a_token_keeps_its_filters(three: CloudCluster) -> None:
    host = uuid.uuid4().hex
    on_host = set(seed_vms(three, 45, "Running", host))
    seed_vms(three, 30, "Running")
    seed_vms(three, 20, "Stopped", host)
    got = walk(three, "/v1/vms", "vms", limit=10, state="Running", host_uuid=host)
    assert {r["uuid"] for r in got} == on_host and len(got) == len(on_host)
    api = three.api()
    page = api.ok("GET", "/v1/vms", 200, params={"limit": 10, "state": "Running"})
    for query in ({"state": "Stopped"}, {}, {"state": "Running", "host_uuid": host}):
        response = api.request("GET", "/v1/vms", params={**query, "continue": page["continue"]})
        assert response.status_code == 400 and response.json()["error"]["field"] == "continue", query
    hosts_page = api.ok("GET", "/v1/hosts", 200)
    assert "continue" not in hosts_page
    for token in ("not-a-token", page["continue"][:-3], "e30"):
        response = api.request("GET", "/v1/vms", params={"continue": token})
        assert response.status_code == 400 and response.json()["error"]["field"] == "continue", token


def test_jobs_and_hosts_page_newest_job_first(three: CloudCluster) -> None:
    api = three.api()
    names = [f"host-{n}" for n in range(12)]
    jobs = [api.submit("POST", "/v1/hosts", {"name": name, "cpu": 8, "memory": 1024}) for name in names]
    for job in jobs:
        assert api.wait(job["id"])["state"] == "Succeeded"
    walked = walk(three, "/v1/jobs", "jobs", limit=5)
    assert [j["id"] for j in walked] == [j["id"] for j in reversed(jobs)]
    hosts = walk(three, "/v1/hosts", "hosts", limit=5)
    assert sorted(h["name"] for h in hosts) == sorted(names) and len(hosts) == 12
    succeeded = walk(three, "/v1/jobs", "jobs", limit=4, state="Succeeded")
    assert len(succeeded) == 12
