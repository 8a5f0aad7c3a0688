"""The operator end to end on the devcluster: a ZStackCluster becomes MN pods that form one ring, scales
both ways with graceful leaves, survives pod deletion, pauses, and is deleted with all its children; a steady
cluster causes no writes; the operator restarts without rewriting anything, and a leader cut off from the API
server exits before a standby takes over.

The MN pods run in containers on the devcluster's node, in external mode against the session's RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from tests.k8s.conftest import wait_for
from tests.operator.conftest import (
    CHILDREN,
    CLUSTER,
    LEADER_LEASE,
    MN_SELECTOR,
    OPERATOR_NS,
    PAUSE,
    TIMEOUT,
    OperatorFactory,
    OperatorProcess,
    Zsc,
    kubeconfig_via,
    kubectl_read,
    printer_columns,
)
from zstack_devcluster.tcpproxy import TcpProxy

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

STATUS_INTERVAL = 1.0  # the operator's --status-interval default
QUIET = 4 * STATUS_INTERVAL  # how long "nothing happens" is watched for
MN_LEASE_DURATION = 5.0  # spec.node.leaseDurationSeconds default; MN Leases renew every heartbeat (1 s)
# The cut-off leader of the HA test gives up 3 s after its last renewal (the standby keeps the roomy defaults).
TIGHT_LEASE = ("--lease-duration", "6", "--renew-deadline", "3", "--retry-period", "0.5")


def assert_owned(key: str, obj: dict[str, Any], cr: dict[str, Any]) -> None:
    """`obj` has a controller ownerReference to the ZStackCluster `cr`."""
    refs = obj["metadata"].get("ownerReferences") or []
    controllers = [r for r in refs if r.get("controller")]
    assert len(controllers) == 1, f"{key}: expected one controller ownerReference, got {refs}"
    ref = controllers[0]
    assert (ref["apiVersion"], ref["kind"], ref["name"], ref["uid"]) == (
        "zstack.io/v1alpha1", "ZStackCluster", CLUSTER, cr["metadata"]["uid"]), f"{key}: owner is {ref}"


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def container(sts: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = sts["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1, f"{sts['metadata']['name']}: containers {[c['name'] for c in containers]}"
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def status_members(status: dict[str, Any]) -> dict[str, str]:
    return {m["pod"]: m["uuid"] for m in (status.get("ring") or {}).get("members") or []}


def all_children(zsc: Zsc, names: list[str]) -> dict[str, dict[str, Any]] | None:
    """The children `names` once they all exist."""
    children = zsc.children(names)
    return children if len(children) == len(names) else None


def wait_children_gone(zsc: Zsc, names: list[str]) -> None:
    wait_for("every child to be garbage-collected", lambda: not zsc.children(names), TIMEOUT, interval=0.5,
             info=lambda: f"left: {sorted(zsc.children(names))}\n{zsc.describe()}")


# ---- create, one ring, scale, pod deletion ----------------------------------------------------------


def test_create_makes_owned_children_and_one_ring_shown_by_kubectl(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply()
    zsc.wait_condition("Ready")
    cr = zsc.cr()
    children = zsc.children()
    assert sorted(children) == sorted(CHILDREN)
    for key, obj in children.items():
        assert_owned(key, obj, cr)
    assert children["Service/demo-mn"]["spec"]["clusterIP"] == "None", "demo-mn is not headless"
    assert zsc.port in [p["port"] for p in children["Service/demo-api"]["spec"]["ports"]]
    assert children["StatefulSet/demo-mn"]["spec"]["replicas"] == 3

    status = cr["status"]
    assert status["observedGeneration"] == cr["metadata"]["generation"]
    assert (status["replicas"], status["readyReplicas"], status["selector"]) == (3, 3, MN_SELECTOR)
    assert (status["broker"], status["database"]) == ("external", "external")
    for kind in ("BrokerReady", "DatabaseReady"):
        assert zsc.condition(kind)["status"] == "True", f"{kind}: {zsc.condition(kind)}"

    rings = zsc.wait_rings(3)
    expected = {pod: ring["self"] for pod, ring in rings.items()}
    status = zsc.wait_status(f"status.ring.members to be {expected}", lambda s: status_members(s) == expected)
    assert status["ring"]["summary"] == "3/3"
    assert (status["ring"]["size"], status["ring"]["agreed"]) == (3, True)

    [row] = printer_columns(zsc.kubectl("get", "zsc", CLUSTER))
    assert row["NAME"] == CLUSTER
    assert (row["REPLICAS"], row["READY"], row["RING"]) == ("3", "3", "3/3"), row
    assert (row["BROKER"], row["DATABASE"]) == ("True", "True"), row


def test_scale_up_then_down_and_the_leavers_leave_gracefully(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply()
    zsc.wait_rings(3)

    zsc.scale(5)
    zsc.wait_summary("5/5")
    five = zsc.wait_rings(5)
    assert zsc.statefulset()["spec"]["replicas"] == 5

    zsc.scale(2)
    leavers, survivors = zsc.pod_names(5)[2:], zsc.pod_names(2)
    zsc.wait_summary("2/2")
    two = zsc.wait_rings(2)
    zsc.wait_pods_gone(leavers)
    assert {pod: ring["self"] for pod, ring in two.items()} == {pod: five[pod]["self"] for pod in survivors}, \
        "a survivor changed its UUID"
    for pod in leavers:
        assert f"left the ring gracefully as {five[pod]['self']}" in zsc.log(pod), f"{pod} did not leave gracefully"
    for pod in survivors:
        assert "evicted MN" not in zsc.log(pod), f"{pod} evicted an MN:\n{zsc.log(pod)[-3000:]}"
    expected = {pod: ring["self"] for pod, ring in two.items()}
    zsc.wait_status(f"status.replicas 2 and status.ring.members {expected}",
                    lambda s: s.get("replicas") == 2 and status_members(s) == expected)


def test_a_deleted_pod_comes_back_and_rejoins_under_a_new_uuid(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply()
    before = zsc.wait_rings(3)
    zsc.wait_summary("3/3")
    old_uid, old_uuid = zsc.pod("demo-mn-1")["metadata"]["uid"], before["demo-mn-1"]["self"]

    zsc.kubectl("delete", "pod", "demo-mn-1")
    wait_changed("demo-mn-1's uid", lambda: (zsc.pod("demo-mn-1") or {}).get("metadata", {}).get("uid"),
                 old_uid, zsc)
    after = zsc.wait_rings(3)

    new_uuid = after["demo-mn-1"]["self"]
    assert new_uuid != old_uuid
    assert old_uuid not in after["demo-mn-0"]["members"]
    assert {p: after[p]["self"] for p in ("demo-mn-0", "demo-mn-2")} == \
        {p: before[p]["self"] for p in ("demo-mn-0", "demo-mn-2")}, "the other MNs were disturbed"
    assert f"left the ring gracefully as {old_uuid}" in zsc.log("demo-mn-1")
    expected = {pod: ring["self"] for pod, ring in after.items()}
    status = zsc.wait_status("status.ring to name demo-mn-1's new UUID", lambda s: status_members(s) == expected)
    assert status["ring"]["summary"] == "3/3"


def test_deleting_the_cluster_deletes_every_child(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply(replicas=2)
    zsc.wait_condition("Ready")
    assert sorted(zsc.children()) == sorted(CHILDREN)

    # No finalizer: deleting works even while no operator runs (the garbage collector does the rest).
    assert operator.stop() == 0
    zsc.kubectl("delete", "zsc", CLUSTER, "--timeout=120s")
    wait_children_gone(zsc, CHILDREN)
    zsc.wait_pods_gone()
    assert not zsc.exists("zsc", CLUSTER)
    wait_for("the MN Leases to go", lambda: not zsc.read("get", "leases", "-l", f"zstack.io/cluster={CLUSTER}",
                                                          "-o", "name").strip(), TIMEOUT, interval=0.5)


# ---- pause, restart, HA -----------------------------------------------------------------------------


def test_pause_freezes_every_child_until_resumed(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply(replicas=2)
    zsc.wait_condition("Ready")
    before = zsc.settled("the children", zsc.writes)

    # The status thread may show ReconciliationPaused before a reconcile saw the annotation: the skipped
    # reconciles (reconciles_total{result="paused"}) tell when the operator itself acted on it.
    paused = operator.reconciles("paused")
    zsc.patch({"metadata": {"annotations": {PAUSE: "true"}}})
    wait_skipped(operator, paused, "the annotation", zsc)
    paused = zsc.settled('reconciles_total{result="paused"}', lambda: operator.reconciles("paused"))
    zsc.wait_condition("ReconciliationPaused", "True")
    # The ConfigMap goes first, so the reconcile that the scale triggers would recreate it if not paused.
    zsc.kubectl("delete", "configmap", "demo-mn-config")
    zsc.scale(4)
    wait_skipped(operator, paused, "the scale", zsc)
    time.sleep(QUIET)
    assert zsc.statefulset()["spec"]["replicas"] == 2, "a paused cluster was scaled"
    assert not zsc.exists("configmap", "demo-mn-config"), "a paused cluster's ConfigMap was recreated"
    kept = [name for name in CHILDREN if name != "ConfigMap/demo-mn-config"]
    assert zsc.writes(kept) == {k: v for k, v in before.items() if k in kept}, "a paused child was written"
    assert zsc.condition("ReconciliationPaused")["status"] == "True"

    zsc.patch({"metadata": {"annotations": {PAUSE: None}}})
    zsc.wait_sts_replicas(4)
    wait_for("the ConfigMap to be recreated", lambda: zsc.exists("configmap", "demo-mn-config"), TIMEOUT,
             interval=0.2, info=zsc.describe)
    assert_owned("ConfigMap/demo-mn-config", zsc.get("configmap", "demo-mn-config"), zsc.cr())
    zsc.wait_condition("ReconciliationPaused", "False")


def wait_skipped(operator: OperatorProcess, paused: float, change: str, zsc: Zsc) -> None:
    """Wait until the operator skipped a reconcile of `change` (reconciles_total{result="paused"} > `paused`)."""
    wait_for(f'the operator to see {change} and skip it (reconciles_total{{result="paused"}} > {paused:g})',
             lambda: operator.reconciles("paused") > paused, TIMEOUT, interval=0.2, info=zsc.describe)


def test_an_operator_restart_rewrites_no_child(operator: OperatorProcess, operator_factory: OperatorFactory,
                                               zsc: Zsc) -> None:
    zsc.apply(replicas=2)
    zsc.wait_condition("Ready")
    zsc.wait_summary("2/2")
    before = zsc.settled("the children", zsc.writes)
    assert sorted(before) == sorted(CHILDREN)

    assert operator.stop() == 0, f"SIGTERM: the operator exited uncleanly:\n{operator.log()[-3000:]}"
    successor = operator_factory()
    successor.wait_leading()
    wait_for("the new operator to reconcile demo", lambda: successor.reconciles("ok") >= 1, TIMEOUT,
             interval=0.2, info=zsc.describe)
    assert f"reconciled {zsc.ns}/{CLUSTER}" in successor.log()
    time.sleep(QUIET)
    after = zsc.writes()
    changed = {key: (before[key], after.get(key)) for key in before if after.get(key) != before[key]}
    assert not changed, f"the restarted operator rewrote children (before, after): {changed}"
    assert zsc.condition("Ready")["status"] == "True"
    assert successor.reconciles("error") == 0


def test_steady_state_writes_nothing_while_resyncs_and_mn_lease_renewals_run(
        operator_factory: OperatorFactory, zsc: Zsc) -> None:
    """MN Lease renewals (every second) and periodic resyncs must not turn into writes: over three MN Lease
    durations the ZStackCluster and its children stay exactly as they are."""
    operator = operator_factory("--resync-interval", "5")
    operator.wait_leading()
    zsc.apply()
    zsc.wait_rings(3)
    zsc.wait_summary("3/3")
    zsc.wait_condition("Ready")
    only_sts = ("StatefulSet/demo-mn",)

    def snapshot() -> tuple[str, dict[str, Any]]:
        return zsc.cr()["metadata"]["resourceVersion"], zsc.writes(status_written=only_sts)

    cr_version, children = zsc.settled("the ZStackCluster and its children", snapshot, quiet=QUIET)
    assert sorted(children) == sorted(CHILDREN)
    updates, resyncs = operator.metric("zstack_operator_status_updates_total"), operator.reconciles("ok")
    renewed = {pod: zsc.get("lease", pod)["spec"]["renewTime"] for pod in zsc.pod_names(3)}

    window = 3 * MN_LEASE_DURATION
    started = time.monotonic()
    wait_for(f"{window:g} s and two periodic reconciles to pass",
             lambda: time.monotonic() - started >= window and operator.reconciles("ok") >= resyncs + 2,
             window + TIMEOUT, interval=0.5, info=zsc.describe)

    assert {pod: zsc.get("lease", pod)["spec"]["renewTime"] for pod in renewed} != renewed, \
        "the MN Leases were not renewed during the window"
    assert operator.reconciles("error") == 0
    assert operator.metric("zstack_operator_status_updates_total") == updates, "the status was patched"
    assert zsc.cr()["metadata"]["resourceVersion"] == cr_version, \
        f"the ZStackCluster was written:\n{zsc.kubectl('get', 'zsc', CLUSTER, '-o', 'yaml')}"
    after = zsc.writes(status_written=only_sts)
    changed = {key: (children[key], after.get(key)) for key in children if after.get(key) != children[key]}
    assert not changed, f"children were written in the steady state (before, after): {changed}"


def leader_lease(zsc: Zsc) -> dict[str, Any]:
    """The operator's leader Lease (KubectlFailed, which `wait_for` retries, when it cannot be read)."""
    return json.loads(kubectl_read(zsc.cluster, "-n", OPERATOR_NS, "get", "lease", LEADER_LEASE, "-o", "json"))


def lease_time(value: str) -> datetime:
    """A Kubernetes MicroTime (UTC) as an aware datetime."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def test_a_leader_cut_off_from_the_api_server_exits_before_the_standby_leads(
        operator_factory: OperatorFactory, operator_rbac: Path, api_proxy: TcpProxy, zsc: Zsc, tmp_path: Path) -> None:
    """The leader reaches the API server through a proxy that is then black-holed. It must give up its
    leadership by exiting (status 1) before the standby's takeover, so that two operators never write at
    once; the standby then reconciles. Both times compared come from the processes themselves (the leader's
    last log line, the standby's acquireTime), so a stall of this test cannot bend the order."""
    proxied = kubeconfig_via(operator_rbac, api_proxy, tmp_path / "proxied-kubeconfig")
    leader = operator_factory(*TIGHT_LEASE, kubeconfig=proxied)
    leader.wait_leading()
    standby = operator_factory()
    standby.wait_healthy()
    wait_for("the standby to log 'waiting to lead'", lambda: "waiting to lead" in standby.log(), 60,
             interval=0.2, info=lambda: standby.log()[-3000:])

    zsc.apply(replicas=1)
    zsc.wait_condition("Ready")
    lease = leader_lease(zsc)
    assert lease["spec"]["holderIdentity"] == leader.identity(), f"the first operator does not hold {lease}"
    assert standby.metric("zstack_operator_leader") == 0
    assert not standby.leading(), f"both operators lead:\n{standby.log()[-3000:]}"

    api_proxy.cut()
    wait_for("the cut-off leader to exit", lambda: not leader.running(), 60, interval=0.2,
             info=lambda: leader.log()[-3000:])
    assert leader.proc.returncode == 1, f"exit status {leader.proc.returncode}:\n{leader.log()[-3000:]}"
    lost = leader.logged_at("lost the leader Lease")  # written by the leader just before it exits
    assert lost is not None, f"the leader did not log 'lost the leader Lease':\n{leader.log()[-3000:]}"

    standby.wait_leading()
    new_identity = standby.identity()

    def taken_over() -> dict[str, Any] | None:
        lease = leader_lease(zsc)
        return lease if lease["spec"].get("holderIdentity") == new_identity else None

    lease = wait_for("the standby to hold the leader Lease", taken_over, 60, interval=0.2)
    acquired = lease_time(lease["spec"]["acquireTime"])
    gave_up = lost.astimezone(UTC) + timedelta(milliseconds=1)  # local asctime, cut to the millisecond
    assert acquired > gave_up, f"the standby took the Lease at {acquired}, before the leader gave up at {gave_up}"
    led = standby.logged_at("leading as")
    assert lost < led, f"the standby led at {led}, before the leader gave up at {lost}"

    zsc.scale(2)
    zsc.wait_sts_replicas(2)
    zsc.wait_summary("2/2")
    assert standby.reconciles("ok") >= 1
    assert f"reconciled {zsc.ns}/{CLUSTER}" in standby.log()


# ---- managed mode, spec changes ---------------------------------------------------------------------


def test_managed_mode_makes_complete_broker_and_database_manifests(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply(replicas=1,
              broker={"external": None, "managed": {"storage": {"size": "2Gi"}}},
              database={"external": None, "managed": {"storage": {"size": "3Gi"}}})
    managed = ["StatefulSet/demo-rabbitmq", "Service/demo-rabbitmq", "Secret/demo-broker",
               "StatefulSet/demo-postgresql", "Service/demo-postgresql", "Secret/demo-database"]
    names = CHILDREN + managed
    children = wait_for("the managed children", lambda: all_children(zsc, names), TIMEOUT, interval=0.5,
                        info=lambda: f"have {sorted(zsc.children(names))}\n{zsc.describe()}")
    cr = zsc.cr()
    for key, obj in children.items():
        assert_owned(key, obj, cr)

    broker = decoded(children["Secret/demo-broker"])
    database = decoded(children["Secret/demo-database"])
    for what, secret, scheme, host in (("broker", broker, "amqp", "demo-rabbitmq"),
                                       ("database", database, "postgresql", "demo-postgresql")):
        assert secret.get("username") and secret.get("password"), f"{what} Secret lacks credentials: {set(secret)}"
        url = urlparse(secret["url"])
        assert url.scheme == scheme, f"{what} url scheme {url.scheme}"
        assert (url.username, unquote(url.password or "")) == (secret["username"], secret["password"]), \
            f"{what} url credentials"
        assert url.hostname.split(".")[0] == host, f"{what} url host {url.hostname}"
    assert database.get("database") and urlparse(database["url"]).path == f"/{database['database']}"

    mn = container(children["StatefulSet/demo-mn"], "mn")
    pod = children["StatefulSet/demo-mn"]["spec"]["template"]["spec"]
    volumes = {v["name"]: {k: v["secret"][k] for k in ("secretName", "items")} for v in pod["volumes"]
               if "secret" in v}
    assert volumes["broker-url"] == {"secretName": "demo-broker", "items": [{"key": "url", "path": "url"}]}
    assert volumes["database-url"] == {"secretName": "demo-database", "items": [{"key": "url", "path": "url"}]}
    assert mn["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert mn["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for key, size in (("StatefulSet/demo-rabbitmq", "2Gi"), ("StatefulSet/demo-postgresql", "3Gi")):
        sts = children[key]
        retention = sts["spec"].get("persistentVolumeClaimRetentionPolicy") or {}
        assert retention.get("whenDeleted") == "Delete", f"{key}: the volumes outlive the cluster: {retention}"
        cont = container(sts)
        assert cont.get("readinessProbe") and cont.get("livenessProbe"), f"{key}: probes missing"
        claims = sts["spec"].get("volumeClaimTemplates") or []
        assert [c["spec"]["resources"]["requests"]["storage"] for c in claims] == [size], f"{key}: claims {claims}"
        mounted = {m["name"] for m in cont.get("volumeMounts") or []}
        assert claims[0]["metadata"]["name"] in mounted, f"{key}: the claim is not mounted"
    assert (zsc.status().get("broker"), zsc.status().get("database")) == ("managed", "managed")

    zsc.kubectl("delete", "zsc", CLUSTER, "--timeout=120s")
    wait_children_gone(zsc, names)


def test_a_node_setting_change_reaches_the_configmap_and_rolls_the_pods(operator: OperatorProcess,
                                                                          zsc: Zsc) -> None:
    zsc.apply(replicas=1)
    children = wait_for("the ConfigMap and StatefulSet",
                        lambda: all_children(zsc, ["ConfigMap/demo-mn-config", "StatefulSet/demo-mn"]),
                        TIMEOUT, interval=0.2, info=zsc.describe)
    config = children["ConfigMap/demo-mn-config"]["data"]
    template = children["StatefulSet/demo-mn"]["spec"]["template"]

    zsc.patch({"spec": {"node": {"heartbeatTimeoutSeconds": 6}}})
    new_config = wait_changed("the ConfigMap", lambda: (zsc.get("configmap", "demo-mn-config") or {})["data"],
                              config, zsc)
    changed = {k: (config.get(k), new_config.get(k)) for k in config.keys() | new_config.keys()
               if config.get(k) != new_config.get(k)}
    assert changed == {"ZSTACK_HEARTBEAT_TIMEOUT": ("4", "6")}

    new_template = wait_changed("the pod template", lambda: (zsc.statefulset() or {})["spec"]["template"],
                                template, zsc)
    old_notes, new_notes = (t["metadata"].get("annotations") or {} for t in (template, new_template))
    assert old_notes != new_notes, "the pod template's annotations (the config hash) did not change"
    cr = wait_for("status.observedGeneration to catch up", lambda: observed(zsc), TIMEOUT, interval=0.2,
                  info=zsc.describe)
    assert cr["metadata"]["generation"] == 2


def wait_changed(what: str, read: Callable[[], Any], old: Any, zsc: Zsc) -> Any:
    """Wait until `read()` differs from `old`; returns the new value."""
    def check() -> Any:
        new = read()
        return new if new != old else None

    return wait_for(f"{what} to change", check, TIMEOUT, interval=0.2, info=zsc.describe)


def observed(zsc: Zsc) -> dict[str, Any] | None:
    """The CR once its status.observedGeneration equals its generation."""
    cr = zsc.cr()
    return cr if (cr.get("status") or {}).get("observedGeneration") == cr["metadata"]["generation"] else None
