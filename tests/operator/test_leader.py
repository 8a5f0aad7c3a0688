"""Leader election for HA operator replicas (zstack_operator.leader) against the devcluster's real API server.

Each test runs electors in threads in a fresh namespace, with short durations, and samples both replicas'
`is_leader` in a tight loop to check that two never lead at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client

from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import wait_for
from zstack_devcluster.tcpproxy import TcpProxy
from zstack_operator.leader import DEFAULT_NAME, LeaderElector

LEASE, RENEW, RETRY = 3.0, 2.0, 0.5
LOGGER = "zstack_operator.leader"


class Replica:
    """One elector running in a thread, with the times its callbacks were called."""

    def __init__(self, elector: LeaderElector, gate: threading.Event | None = None) -> None:
        """With a `gate`, on_started_leading blocks until it is set (a callback that hangs)."""
        self.elector, self.gate = elector, gate
        self.started: list[float] = []
        self.stopped: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=elector.run, args=(self._on_started, self._on_stopped, self.stop),
                                       daemon=True, name=f"elector-{elector.identity}")

    def _on_started(self) -> None:
        self.started.append(time.monotonic())
        if self.gate is not None:
            self.gate.wait(60)

    def _on_stopped(self) -> None:
        self.stopped.append(time.monotonic())

    @property
    def identity(self) -> str:
        return self.elector.identity

    def start(self) -> Replica:
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), f"elector {self.identity} did not stop"


class Sampler:
    """Samples `is_leader` of two replicas in a tight loop: (time, first leads, second leads)."""

    def __init__(self, first: Replica, second: Replica) -> None:
        self.samples: list[tuple[float, bool, bool]] = []
        self._pair = (first, second)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        first, second = self._pair
        while not self._stop.is_set():
            # The second flag is read first: both True then means the first still led after the second began.
            second_leads = second.elector.is_leader
            first_leads = first.elector.is_leader
            self.samples.append((time.monotonic(), first_leads, second_leads))
            time.sleep(0.0005)

    def overlaps(self) -> list[tuple[float, bool, bool]]:
        return [s for s in self.samples if s[1] and s[2]]


@pytest.fixture
def namespace(devcluster: KubeCluster) -> Iterator[str]:
    ns = f"leader-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        devcluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def replicas(devcluster: KubeCluster, namespace: str) -> Iterator[list[Replica]]:
    """Replicas the test creates (append to the list); all are stopped at the end."""
    made: list[Replica] = []
    yield made
    for replica in made:
        replica.stop.set()
    for replica in made:
        replica.thread.join(15)


def elector(api_client: Any, namespace: str, identity: str, **kwargs: Any) -> LeaderElector:
    durations = {"lease_duration": LEASE, "renew_deadline": RENEW, "retry_period": RETRY} | kwargs
    return LeaderElector(api_client, namespace, identity=identity, **durations)


def lease(devcluster: KubeCluster, namespace: str) -> dict[str, Any]:
    """The Lease's spec, read with kubectl."""
    return json.loads(devcluster.kubectl("-n", namespace, "get", "lease", DEFAULT_NAME, "-o", "json").stdout)["spec"]


def micro_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def renewed_for(spec: dict[str, Any]) -> float:
    """How long the holder of `spec` has renewed it, by the Lease's own timestamps."""
    return (micro_time(spec["renewTime"]) - micro_time(spec["acquireTime"])).total_seconds()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.mark.k8s
def test_one_of_two_leads_and_the_other_waits(devcluster: KubeCluster, namespace: str,
                                              replicas: list[Replica], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    a = Replica(elector(devcluster.api_client(), namespace, "replica-a"))
    b = Replica(elector(devcluster.api_client(), namespace, "replica-b"))
    replicas += [a, b]
    with Sampler(a, b) as sampler:
        a.start()
        b.start()
        leader = wait_for("one replica to lead", lambda: next((r for r in (a, b) if r.elector.is_leader), None), 30)
        standby = b if leader is a else a
        # Renewed for longer than two lease durations: a standby ignoring renewals would have taken over.
        wait_for("the leader to renew for 2 lease durations", lambda: renewed_for(lease(devcluster, namespace))
                 > 2 * LEASE, 30)
    spec = lease(devcluster, namespace)
    assert spec["holderIdentity"] == leader.identity
    assert spec["leaseTransitions"] == 0
    assert spec["leaseDurationSeconds"] == LEASE
    assert len(leader.started) == 1 and not leader.stopped
    assert not standby.started and not standby.elector.is_leader
    assert standby.elector.holder() == leader.identity
    assert not sampler.overlaps()
    assert f"leading as {leader.identity}" in messages(caplog)
    assert f"waiting to lead: {leader.identity} holds Lease {namespace}/{DEFAULT_NAME}" in messages(caplog)


@pytest.mark.k8s
def test_graceful_stop_releases_the_lease_and_the_standby_takes_over_at_once(
        devcluster: KubeCluster, namespace: str, replicas: list[Replica], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # A Lease far longer than the waits below: the standby can only lead this soon if the Lease was released.
    long = {"lease_duration": 120.0, "renew_deadline": RENEW, "retry_period": RETRY}
    a = Replica(elector(devcluster.api_client(), namespace, "replica-a", **long))
    b = Replica(elector(devcluster.api_client(), namespace, "replica-b", **long))
    replicas += [a, b]
    a.start()
    wait_for("replica-a to lead", lambda: a.elector.is_leader, 30)
    b.start()
    wait_for("replica-b to see replica-a holding the Lease", lambda: b.elector.holder() == a.identity, 30)
    a.shutdown()
    assert not a.elector.is_leader
    assert f"released the Lease {namespace}/{DEFAULT_NAME}" in messages(caplog)
    assert lease(devcluster, namespace).get("holderIdentity") in (None, "", b.identity)
    wait_for("replica-b to lead after the release", lambda: b.elector.is_leader, 30)
    spec = lease(devcluster, namespace)
    assert spec["holderIdentity"] == b.identity
    assert spec["leaseTransitions"] == 1
    assert a.stopped[0] < b.started[0], "replica-b started leading before replica-a had stopped"


@pytest.mark.k8s
def test_a_leader_that_stops_renewing_is_replaced_only_after_the_lease_duration(
        devcluster: KubeCluster, namespace: str, replicas: list[Replica], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # release_on_cancel=False: on stop it just stops renewing, as a crashed process would.
    a = Replica(elector(devcluster.api_client(), namespace, "replica-a", release_on_cancel=False))
    b = Replica(elector(devcluster.api_client(), namespace, "replica-b"))
    replicas += [a, b]
    with Sampler(a, b) as sampler:
        a.start()
        wait_for("replica-a to lead", lambda: a.elector.is_leader, 30)
        b.start()
        wait_for("replica-a to renew for 2 lease durations", lambda: renewed_for(lease(devcluster, namespace))
                 > 2 * LEASE, 30)
        assert not b.started, "the standby led while the leader kept renewing"
        a.shutdown()
        last = lease(devcluster, namespace)
        assert last["holderIdentity"] == a.identity, "the crashed leader's Lease was released"
        wait_for("replica-b to take the expired Lease over", lambda: b.elector.is_leader, 30)
    spec = lease(devcluster, namespace)
    assert spec["holderIdentity"] == b.identity
    assert spec["leaseTransitions"] == 1
    # By the Lease's own timestamps, the takeover came a full lease duration after the last renewal.
    waited = (micro_time(spec["acquireTime"]) - micro_time(last["renewTime"])).total_seconds()
    assert waited >= LEASE - 0.001, f"replica-b took over {waited:.3f} s after the last renewal (< {LEASE} s)"
    assert not sampler.overlaps()
    assert not any(m.startswith("released the Lease") for m in messages(caplog))


@pytest.mark.k8s
def test_a_leader_cut_off_from_the_api_server_steps_down_before_the_standby_takes_over(
        devcluster: KubeCluster, namespace: str, replicas: list[Replica], api_proxy: TcpProxy,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    proxy = api_proxy
    via_proxy = devcluster.api_client()
    via_proxy.configuration.host = f"https://{proxy.address[0]}:{proxy.address[1]}"
    a = Replica(elector(via_proxy, namespace, "replica-a"))
    b = Replica(elector(devcluster.api_client(), namespace, "replica-b"))
    replicas += [a, b]
    with Sampler(a, b) as sampler:
        a.start()
        wait_for("replica-a to lead", lambda: a.elector.is_leader, 30)
        b.start()
        wait_for("replica-b to see replica-a holding the Lease", lambda: b.elector.holder() == a.identity, 30)
        proxy.cut()  # replica-a's renewals now hang until their timeout
        wait_for("replica-b to take over", lambda: b.elector.is_leader, 30)
        wait_for("replica-a to report the loss", lambda: a.stopped, 30)
    assert not sampler.overlaps(), f"both led at once: {sampler.overlaps()[:3]}"
    last_a = max(t for t, a_leads, _ in sampler.samples if a_leads)
    first_b = min(t for t, _, b_leads in sampler.samples if b_leads)
    assert last_a < first_b
    assert a.stopped[0] < b.started[0], "replica-a reported its loss only after replica-b started leading"
    assert f"lost the Lease {namespace}/{DEFAULT_NAME}: no renewal succeeded within {RENEW:g} s" \
        in messages(caplog)
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
              and "retrying" in r.getMessage()]
    assert errors and all(r.exc_info is None and "\n" not in r.getMessage() for r in errors)
    assert lease(devcluster, namespace)["holderIdentity"] == b.identity
    # Reconnected, the old leader waits as a standby.
    proxy.heal()
    wait_for("replica-a to see replica-b holding the Lease", lambda: a.elector.holder() == b.identity, 30)
    assert not a.elector.is_leader and len(a.started) == 1


@pytest.mark.k8s
def test_a_leader_stuck_in_its_callback_stops_being_leader_by_the_renew_deadline(
        devcluster: KubeCluster, namespace: str, replicas: list[Replica], caplog: pytest.LogCaptureFixture) -> None:
    """No renewal while on_started_leading hangs: is_leader turns False by itself, before the standby leads."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    gate = threading.Event()
    a = Replica(elector(devcluster.api_client(), namespace, "replica-a"), gate=gate)
    b = Replica(elector(devcluster.api_client(), namespace, "replica-b"))
    replicas += [a, b]
    try:
        with Sampler(a, b) as sampler:
            a.start()
            wait_for("replica-a to lead", lambda: a.started, 30)
            b.start()
            wait_for("replica-b to take over", lambda: b.elector.is_leader, 30)
            assert not a.elector.is_leader and not a.stopped  # still stuck in its callback
            gate.set()
            wait_for("replica-a to report the loss", lambda: a.stopped, 30)
    finally:
        gate.set()
    assert not sampler.overlaps(), f"both led at once: {sampler.overlaps()[:3]}"
    assert any(a_leads for _, a_leads, _ in sampler.samples), "replica-a never led"
    assert f"lost the Lease {namespace}/{DEFAULT_NAME}: no renewal succeeded within {RENEW:g} s" in messages(caplog)
    assert lease(devcluster, namespace)["holderIdentity"] == b.identity


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"renew_deadline": 15.0}, "renew_deadline"),
    ({"lease_duration": 5.0}, "renew_deadline"),
    ({"retry_period": 10.0}, "retry_period"),
    ({"retry_period": 0.0}, "retry_period"),
    ({"lease_duration": float("nan")}, "lease_duration"),
    ({"namespace": ""}, "namespace"),
    ({"identity": ""}, "identity"),
])
def test_bad_settings_are_refused_naming_the_argument(kwargs: dict[str, Any], named: str) -> None:
    args = {"namespace": "default"} | kwargs
    with pytest.raises(ValueError, match=rf"^{named} "):
        LeaderElector(client.ApiClient(), **args)
