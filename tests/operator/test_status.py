"""The status the operator derives from what it sees: the agreed ring and the conditions (pure logic)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from zstack_operator.cluster import Cluster
from zstack_operator.observe import MnPod, Observation, agreed_ring
from zstack_operator.status import ReconcileState, build_status, same_status


def cluster(replicas: int = 3, paused: bool = False, broker: dict[str, Any] | None = None) -> Cluster:
    spec = {"replicas": replicas, "broker": broker or {"external": {"secretRef": {"name": "b", "key": "url"}}},
            "database": {"external": {"secretRef": {"name": "d", "key": "url"}}}}
    annotations = {"zstack.io/pause-reconciliation": "true"} if paused else {}
    return Cluster("demo", "ns", "uid-1", 2, spec, annotations)


def mn(i: int, members: list[str], ready: bool = True, state: str = "running", epoch: int = 7,
       terminating: bool = False, failure: str | None = None) -> MnPod:
    ring = {"self": f"u{i}", "epoch": epoch, "members": members, "state": state}
    return MnPod(f"demo-mn-{i}", f"127.0.1.{i}", ready, terminating, failure, ring)


def sts(replicas: int, ready: int, generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "status": {"replicas": replicas, "readyReplicas": ready, "observedGeneration": observed,
                       "currentRevision": "r1", "updateRevision": "r1", "updatedReplicas": replicas}}


def seen(pods: list[MnPod], statefulset: dict[str, Any] | None) -> Observation:
    members, agreed, epochs = agreed_ring(pods)
    return Observation(statefulset, pods, None, None, members, agreed, epochs)


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


ALL = ["u0", "u1", "u2"]


def test_three_agreeing_mns_make_a_ready_cluster_with_ring_3_of_3() -> None:
    status = build_status(cluster(), seen([mn(i, ALL) for i in range(3)], sts(3, 3)), ReconcileState(2), None)
    assert status["ring"]["summary"] == "3/3" and status["ring"]["agreed"] is True
    assert [m["pod"] for m in status["ring"]["members"]] == ["demo-mn-0", "demo-mn-1", "demo-mn-2"]
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Progressing")["status"] == "False"
    assert condition(status, "BrokerReady")["reason"] == "Connected"
    assert status["observedGeneration"] == 2 and status["selector"] == \
        "app.kubernetes.io/instance=demo,app.kubernetes.io/component=mn"


def test_a_member_one_mn_still_lists_but_nobody_answers_for_is_not_counted() -> None:
    pods = [mn(0, ALL + ["gone"]), mn(1, ALL), mn(2, ALL)]
    status = build_status(cluster(), seen(pods, sts(3, 3)), ReconcileState(2), None)
    assert status["ring"]["size"] == 3 and status["ring"]["agreed"] is False
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Progressing")["reason"] == "RingConverging"


def test_an_mn_not_yet_joined_keeps_the_ring_short_and_the_cluster_scaling_up() -> None:
    pods = [mn(0, ALL[:2]), mn(1, ALL[:2]), mn(2, [], ready=False, state="joining")]
    status = build_status(cluster(), seen(pods, sts(3, 2)), ReconcileState(2), None)
    assert status["ring"]["summary"] == "2/3"
    assert condition(status, "Progressing")["reason"] == "ScalingUp"
    assert condition(status, "Ready")["reason"] == "ScalingUp"


def test_scale_down_names_the_leavers() -> None:
    pods = [mn(i, ALL) for i in range(3)]
    status = build_status(cluster(replicas=2), seen(pods, sts(3, 3)), ReconcileState(2), None)
    progressing = condition(status, "Progressing")
    assert progressing["reason"] == "ScalingDown" and "demo-mn-2" in progressing["message"]
    assert status["ring"]["summary"] == "3/2"


def test_a_failing_pod_or_a_failed_reconcile_degrades_the_cluster() -> None:
    pods = [mn(0, ALL[:2]), mn(1, ALL[:2]), MnPod("demo-mn-2", None, False, False, "CreateContainerConfigError: "
                                                  'secret "b" not found')]
    status = build_status(cluster(), seen(pods, sts(3, 2)), ReconcileState(2), None)
    assert condition(status, "Degraded")["reason"] == "PodFailing"
    assert 'secret "b" not found' in condition(status, "Ready")["message"]
    failed = build_status(cluster(), seen(pods, sts(3, 2)), ReconcileState(1, "could not write StatefulSet x"), None)
    assert condition(failed, "Degraded")["reason"] == "ReconcileFailed"
    assert failed["observedGeneration"] == 1


def test_external_broker_is_not_ready_until_an_mn_proves_the_connection() -> None:
    pods = [mn(0, [], ready=False, state="joining")]
    status = build_status(cluster(replicas=1), seen(pods, sts(1, 0)), ReconcileState(2), None)
    assert condition(status, "BrokerReady")["status"] == "False"
    assert condition(status, "BrokerReady")["reason"] == "NotConnected"


def test_managed_broker_follows_its_statefulset() -> None:
    managed = cluster(broker={"managed": {}})
    pods = [mn(i, ALL) for i in range(3)]
    creating = build_status(managed, seen(pods, sts(3, 3)), ReconcileState(2), None)
    assert condition(creating, "BrokerReady")["reason"] == "Creating"
    ready_obs = Observation(sts(3, 3), pods, sts(1, 1), None, *agreed_ring(pods))
    assert condition(build_status(managed, ready_obs, ReconcileState(2), None), "BrokerReady")["status"] == "True"


def test_replicas_zero_is_reported_as_scaled_to_zero_and_pause_as_a_condition() -> None:
    status = build_status(cluster(replicas=0, paused=True), seen([], sts(0, 0)), ReconcileState(2), None)
    assert condition(status, "Ready")["reason"] == "ScaledToZero"
    assert condition(status, "ReconciliationPaused")["status"] == "True"
    assert status["ring"]["summary"] == "0/0"


def test_transition_times_change_only_when_a_condition_flips() -> None:
    pods = [mn(i, ALL) for i in range(3)]
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    first = build_status(cluster(), seen(pods, sts(3, 3)), ReconcileState(2), None, now=t0)
    again = build_status(cluster(), seen(pods, sts(3, 3)), ReconcileState(2), first, now=t0 + dt.timedelta(hours=1))
    assert again == first and same_status(first, again)
    down = build_status(cluster(), seen(pods[:2], sts(3, 2)), ReconcileState(2), first, now=t0 + dt.timedelta(hours=2))
    assert condition(down, "Ready")["lastTransitionTime"] == "2026-01-01T02:00:00Z"
    assert condition(down, "BrokerReady")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert not same_status(first, down)


def test_a_paused_cluster_is_not_reported_as_progressing() -> None:
    pods = [mn(i, ALL[:2]) for i in range(2)]
    status = build_status(cluster(replicas=4, paused=True), seen(pods, sts(2, 2)), ReconcileState(2), None)
    assert condition(status, "Progressing")["reason"] == "Paused"
    assert condition(status, "Ready")["reason"] == "Converging" and "2/4" in condition(status, "Ready")["message"]


def test_ready_mns_whose_rings_cannot_be_read_are_named_unobservable() -> None:
    pods = [MnPod(f"demo-mn-{i}", f"127.0.1.{i}", True, False, None, None) for i in range(3)]
    status = build_status(cluster(), seen(pods, sts(3, 3)), ReconcileState(2), None)
    assert condition(status, "Progressing")["reason"] == "RingUnobservable"
    assert "NetworkPolicies" in condition(status, "Ready")["message"]
