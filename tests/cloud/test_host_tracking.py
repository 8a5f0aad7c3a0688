"""Host tracking on three real MNs: each host pinged by its ring owner, taken over after kill -9, hosts added
and deleted picked up. Setup shortcut: most hosts are INSERTed straight into the hosts table, as an operator's
import or another tool would; the tracker must find those too."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cloud.conftest import CloudCluster
from zstack_devcluster.localnodes import LocalNode, wait_until
from zstack_node.ring import Ring

pytestmark = pytest.mark.slow

FAST = {"ZSTACK_HOST_PING_INTERVAL": "0.2"}


def seed_hosts(cloud: CloudCluster, count: int) -> list[str]:
    """INSERT `count` Connected hosts directly; their UUIDs."""
    uuids = [uuid.uuid4().hex for _ in range(count)]
    cloud.sql("INSERT INTO hosts (uuid, name, cpu_capacity, memory_capacity, state)"
              " SELECT u, 'seeded-' || n, 8, 8192, 'Connected' FROM unnest(CAST(:u AS varchar[]))"
              " WITH ORDINALITY AS t(u, n)", u=uuids)
    return uuids


def metric(node: LocalNode, name: str) -> float:
    """The sum of a metric's samples on one MN."""
    return sum(s.value for f in text_string_to_metric_families(node.text("/metrics")) for s in f.samples
               if s.name == name)


def tracked_by(cloud: CloudCluster) -> dict[str, str | None]:
    return {r.uuid: r.tracked_by for r in cloud.sql("SELECT uuid, tracked_by FROM hosts")}


def wait_owned_by(cloud: CloudCluster, nodes: list[LocalNode], ring: Ring, timeout: float = 30) -> None:
    """Wait until every host row is stamped by its owner in `ring` and the MNs' gauges add up to the hosts."""
    def settled() -> bool:
        rows = tracked_by(cloud)
        return (all(owner == ring.owner(u) for u, owner in rows.items())
                and sum(metric(n, "zstack_hosts_tracked") for n in nodes) == len(rows))

    wait_until(settled, timeout, "every host to be tracked by its ring owner", interval=0.1)


@pytest.mark.timeout(180)
def test_every_host_is_pinged_by_its_owner_and_a_killed_mns_hosts_move_to_the_survivors(cloud):
    nodes = cloud.start(3, env=FAST)
    ring = Ring.of(cloud.wait_agreed({n.uuid for n in nodes}))
    hosts = seed_hosts(cloud, 300)
    wait_owned_by(cloud, nodes, ring)
    share = {n.name: sum(ring.owner(h) == n.uuid for h in hosts) for n in nodes}
    assert {n.name: metric(n, "zstack_hosts_tracked") for n in nodes} == share
    assert cloud.sql("SELECT count(*) FROM hosts WHERE last_ping_at IS NULL") == [(0,)]

    # Every MN keeps pinging its share: three more rounds of pings, each ping timed in the lag histogram.
    before = {n.name: (metric(n, "zstack_host_pings_total"), metric(n, "zstack_host_ping_lag_seconds_count"))
              for n in nodes}
    wait_until(lambda: all(metric(n, "zstack_host_pings_total") - before[n.name][0] >= 3 * share[n.name]
                           for n in nodes), 30, "three rounds of pings on every MN", interval=0.1)
    for node in nodes:
        assert metric(node, "zstack_host_ping_lag_seconds_count") > before[node.name][1], node.name
        assert metric(node, 'zstack_host_pings_total') > 0 and metric(node, "zstack_hosts_disconnected_total") == 0

    victim = max(nodes, key=lambda n: share[n.name])
    survivors = [n for n in nodes if n is not victim]
    gone = victim.uuid
    victim.kill()
    new_ring = Ring.of(cloud.wait_agreed({n.uuid for n in survivors}, timeout=30))
    wait_owned_by(cloud, survivors, new_ring, timeout=30)
    assert {n.name: metric(n, "zstack_hosts_tracked") for n in survivors} == {
        n.name: sum(new_ring.owner(h) == n.uuid for h in hosts) for n in survivors}
    assert gone not in set(tracked_by(cloud).values())


@pytest.mark.timeout(180)
def test_hosts_added_and_deleted_are_picked_up(cloud):
    nodes = cloud.start(3, env=FAST)
    ring = Ring.of(cloud.wait_agreed({n.uuid for n in nodes}))
    seed_hosts(cloud, 60)
    wait_owned_by(cloud, nodes, ring)

    api = cloud.api()
    added = api.add_host(cpu=4, memory=4096)
    (imported,) = seed_hosts(cloud, 1)
    wait_owned_by(cloud, nodes, ring)
    rows = tracked_by(cloud)
    assert (rows[added["uuid"]], rows[imported]) == (ring.owner(added["uuid"]), ring.owner(imported))

    job = api.run("DELETE", f"/v1/hosts/{added['uuid']}")
    assert job["state"] == "Succeeded", job
    cloud.sql("DELETE FROM hosts WHERE uuid = :u", u=imported)  # behind the MNs' back: the next full read sees it
    wait_until(lambda: sum(metric(n, "zstack_hosts_tracked") for n in nodes) == 60, 30,
               "the MNs to stop tracking the deleted hosts", interval=0.1)
    # The trackers never bring a deleted host back, and track the rest as before.
    assert cloud.sql("SELECT count(*) FROM hosts") == [(60,)]
    wait_owned_by(cloud, nodes, ring)


@pytest.mark.timeout(120)
def test_a_host_that_stops_answering_is_disconnected_by_its_owner_among_many(cloud):
    nodes = cloud.start(2, env={**FAST, "ZSTACK_HOST_PING_FAILURES": "3"})
    ring = Ring.of(cloud.wait_agreed({n.uuid for n in nodes}))
    hosts = seed_hosts(cloud, 100)
    wait_owned_by(cloud, nodes, ring)
    broken = hosts[:2]
    cloud.sql("INSERT INTO sim_host_faults (host_uuid) SELECT unnest(CAST(:u AS varchar[]))", u=broken)
    wait_until(lambda: {r.uuid for r in cloud.sql("SELECT uuid FROM hosts WHERE state = 'Disconnected'")}
               == set(broken), 30, "exactly the two broken hosts to be Disconnected", interval=0.1)
    assert sum(metric(n, "zstack_hosts_disconnected_total") for n in nodes) == 2
    cloud.sql("DELETE FROM sim_host_faults")
    for host in broken:
        job = cloud.api().run("POST", f"/v1/hosts/{host}/actions/reconnect")
        assert job["state"] == "Succeeded" and job["result"]["state"] == "Connected", job
    # Reconnected, they are tracked as Connected hosts again: a new fault disconnects one again.
    cloud.sql("INSERT INTO sim_host_faults (host_uuid) VALUES (:u)", u=broken[0])
    wait_until(lambda: cloud.sql("SELECT state FROM hosts WHERE uuid = :u", u=broken[0]) == [("Disconnected",)],
               30, "the host to be Disconnected again", interval=0.1)
    assert sum(metric(n, "zstack_hosts_disconnected_total") for n in nodes) == 3
