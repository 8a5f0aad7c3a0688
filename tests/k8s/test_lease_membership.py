"""Lease membership of MN pods on the devcluster (issue 5), with real RabbitMQ and PostgreSQL.

Measured figures are printed as JSON lines starting with `FIGURE` (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest

from tests.k8s.conftest import (
    CLUSTER,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    LEASE_DURATION,
    SA,
    MnPods,
    RingRecorder,
    get_json,
    metric,
    wait_for,
)
from zstack_devcluster import controlplane

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def figure(name: str, **values: object) -> None:
    print("FIGURE " + json.dumps({"figure": name, **values}), flush=True)


def lease_events(pods: MnPods) -> dict[str, float]:
    totals = {"none": 0.0, "ring_change": 0.0}
    for name in pods.names():
        text = pods.metrics(name)
        for effect in totals:
            totals[effect] += metric(text, "zstack_lease_events_total", effect=effect)
    return totals


def fences(pods: MnPods) -> float:
    return sum(metric(pods.metrics(n), "zstack_membership_fences_total") for n in pods.names())


def test_every_mn_holds_its_lease_and_all_agree_on_one_ring(mn_pods: MnPods) -> None:
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    listed = json.loads(mn_pods.kubectl("get", "leases", "-l", f"zstack.io/cluster={CLUSTER}", "-o", "json"))
    assert sorted(item["metadata"]["name"] for item in listed["items"]) == mn_pods.names()
    for name, ring in rings.items():
        lease, pod = mn_pods.lease(name), mn_pods.pod(name)
        assert lease["spec"]["holderIdentity"] == ring["self"], f"{name}: holder is not its MN UUID"
        assert lease["spec"]["leaseDurationSeconds"] == int(LEASE_DURATION)
        assert lease["metadata"]["labels"]["zstack.io/cluster"] == CLUSTER
        owners = lease["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Pod", name, pod["metadata"]["uid"])]
    assert len({r["epoch"] for r in rings.values()}) == 1
    # Renewals go on (every interval) without rebuilding any ring.
    before, log_lines = lease_events(mn_pods), {n: len(mn_pods.log(n).splitlines()) for n in mn_pods.names()}
    time.sleep(3 * HEARTBEAT_INTERVAL)
    after = lease_events(mn_pods)
    logged = {n: mn_pods.log(n).splitlines()[log_lines[n]:] for n in mn_pods.names()}
    assert not any(logged.values()), f"renewals were logged: {logged}"
    assert after["none"] > before["none"], "no renewal events were seen"
    assert after["ring_change"] == before["ring_change"], "a renewal rebuilt a ring"
    assert {r["epoch"] for r in mn_pods.rings().values()} == {r["epoch"] for r in rings.values()}
    for name in mn_pods.names():
        text = mn_pods.metrics(name)
        by_source = {src: metric(text, "zstack_membership_members", source=src) for src in ("db", "lease", "both")}
        assert by_source == {"db": 3, "lease": 3, "both": 3}, f"{name}: {by_source}"
        assert metric(text, "zstack_lease_view_trusted") == 1
        assert metric(text, "zstack_lease_renew_seconds_count") >= 3
        assert metric(text, "zstack_lease_renew_failures_total") == 0
    figure("lease_events_steady", none=after["none"] - before["none"], seconds=3 * HEARTBEAT_INTERVAL)


def test_deleted_pod_leaves_every_ring_within_1s_and_rejoins_with_a_new_uuid(mn_pods: MnPods) -> None:
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    victim, others = mn_pods.names()[1], [mn_pods.names()[0], mn_pods.names()[2]]
    old_uuid, old_uid = rings[victim]["self"], mn_pods.pod(victim)["metadata"]["uid"]
    events_before = lease_events(mn_pods)
    core = mn_pods.core  # logged in before the clock starts
    with RingRecorder(mn_pods, others) as recorder:
        time.sleep(0.2)
        t0 = time.monotonic()
        core.delete_namespaced_pod(victim, mn_pods.ns)  # graceful: SIGTERM, the MN leaves
        wait_for("the others to drop the deleted pod's MN",
                 lambda: all(recorder.first_without(n, old_uuid, t0) for n in others), 15, info=mn_pods.describe)
    dropped = {n: recorder.first_without(n, old_uuid, t0) - t0 for n in others}
    figure("graceful_delete_convergence_s", **{n: round(s, 3) for n, s in dropped.items()})
    assert max(dropped.values()) <= 1.0, f"survivors dropped the deleted pod after {dropped} s (> 1 s)"
    # Its Lease is gone with it, then the StatefulSet brings the pod back and it rejoins as a new MN.
    wait_for("the old Lease to go", lambda: (mn_pods.lease(victim) or {}).get("spec", {}).get("holderIdentity")
             != old_uuid, 30, info=mn_pods.describe)
    wait_for("the pod to come back", lambda: (mn_pods.pod(victim) or {}).get("metadata", {}).get("uid")
             not in (None, old_uid), 60, info=mn_pods.describe)
    rings = mn_pods.wait_agreed(3, timeout=90)
    new_uuid = rings[victim]["self"]
    assert new_uuid != old_uuid
    assert all(old_uuid not in r["members"] for r in rings.values())
    lease = mn_pods.lease(victim)
    assert lease["spec"]["holderIdentity"] == new_uuid
    assert lease["metadata"]["ownerReferences"][0]["uid"] == mn_pods.pod(victim)["metadata"]["uid"]
    events = lease_events(mn_pods)
    figure("lease_events_delete_test", none=events["none"], ring_change=events["ring_change"],
           before_delete=events_before)


def test_killed_mn_is_dropped_within_the_lease_duration_plus_one_interval(mn_pods: MnPods) -> None:
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    victim, others = mn_pods.names()[2], mn_pods.names()[:2]
    old_uuid, pid = rings[victim]["self"], mn_pods.pid(victim)
    with RingRecorder(mn_pods, others) as recorder:
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for("the others to drop the killed MN",
                 lambda: all(recorder.first_without(n, old_uuid, t0) for n in others), 30, info=mn_pods.describe)
    dropped = {n: recorder.first_without(n, old_uuid, t0) - t0 for n in others}
    figure("kill9_convergence_s", **{n: round(s, 3) for n, s in dropped.items()})
    limit = LEASE_DURATION + HEARTBEAT_INTERVAL
    assert max(dropped.values()) <= limit, f"survivors dropped the killed MN after {dropped} s (> {limit} s)"
    # The kubelet restarts the container: the new process takes the pod's Lease over with a new UUID.
    rings = mn_pods.wait_agreed(3, timeout=90)
    assert rings[victim]["self"] != old_uuid
    assert mn_pods.lease(victim)["spec"]["holderIdentity"] == rings[victim]["self"]
    figure("lease_events_kill9_test", **lease_events(mn_pods))


def test_api_server_outage_evicts_nobody(mn_pods: MnPods) -> None:
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    members = {r["self"] for r in rings.values()}
    fences_before = fences(mn_pods)
    root = mn_pods.cluster.root
    with RingRecorder(mn_pods, mn_pods.names(), period=0.05) as recorder:
        t0 = time.monotonic()
        assert controlplane.stop_components(root, ["kube-apiserver"]) == ["kube-apiserver"]
        stopped = time.monotonic()
        time.sleep(3 * LEASE_DURATION)
        restart = time.monotonic()
        try:
            controlplane.up(root)
        finally:
            down_s = time.monotonic() - stopped
        time.sleep(3 * LEASE_DURATION)  # the dangerous part: Leases look old when the API server is back
    seen = {(r["self"], r["epoch"], tuple(r["members"]), r["state"]) for samples in recorder.samples.values()
            for _, r in samples if r}
    changed = [s for s in seen if set(s[2]) != members or s[3] != "running"]
    fenced = fences(mn_pods) - fences_before
    events = lease_events(mn_pods)
    figure("api_server_outage", lease_events=events, stopped_s=round(down_s, 1), stop_took_s=round(stopped - t0, 1),
           restart_took_s=round(time.monotonic() - restart - 3 * LEASE_DURATION, 1),
           ring_views=len(seen), fences=fenced)
    assert not changed, f"a ring changed or an MN stopped running during the outage: {changed}"
    assert fenced == 0, "an MN fenced itself while its DB heartbeat worked"
    assert mn_pods.wait_agreed(3) and {r["self"] for r in mn_pods.rings().values()} == members
    wait_for("every Lease renewed by its holder again", lambda: all(
        mn_pods.lease(n)["spec"]["holderIdentity"] == rings[n]["self"] for n in mn_pods.names()), 30)
    logs = "\n".join(mn_pods.log(n) for n in mn_pods.names())
    assert "Leases decide nothing" in logs, "the MNs did not notice the outage"


def test_db_outage_suspends_every_mn_and_all_resume_with_their_uuids(mn_pods: MnPods, postgres) -> None:
    """An outage of the database that every MN shares blames nobody (rule 1b): each MN suspends (stops
    serving, keeps its UUID and its Lease), and resumes when the database is back; nobody fences or evicts."""
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    old = {n: r["self"] for n, r in rings.items()}
    fences_before = fences(mn_pods)
    postgres.stop()
    try:
        states = wait_for("every MN to suspend", lambda: (lambda st: st if set(st.values()) == {"suspended"} else None)(
            {n: mn_pods.ring(n)["state"] for n in mn_pods.names()}), 2 * HEARTBEAT_TIMEOUT)
        time.sleep(2 * HEARTBEAT_TIMEOUT)  # the outage outlasts the heartbeat timeout: its length, not a wait
    finally:
        postgres.start()
    t_back = time.monotonic()
    rings = mn_pods.wait_agreed(3, timeout=60)
    figure("db_outage", states_during=states, resumed_after_db_back_s=round(time.monotonic() - t_back, 1))
    assert {n: r["self"] for n, r in rings.items()} == old, "an MN changed its UUID over a shared outage"
    assert fences(mn_pods) == fences_before
    for name in mn_pods.names():
        assert mn_pods.lease(name)["spec"]["holderIdentity"] == old[name]
        assert "evicted MN" not in mn_pods.log(name)


def test_stopped_mn_is_evicted_and_rejoins_with_a_new_uuid_after_sigcont(mn_pods: MnPods) -> None:
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    victim, others = mn_pods.names()[0], mn_pods.names()[1:]
    old_uuid, pid, ip = rings[victim]["self"], mn_pods.pid(victim), mn_pods.ip(victim)
    with RingRecorder(mn_pods, others) as recorder:
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for("the others to evict the stopped MN",
                     lambda: all(recorder.first_without(n, old_uuid, t0) for n in others), 2 * LEASE_DURATION)
            time.sleep(max(0.0, t0 + 2 * LEASE_DURATION - time.monotonic()))
        finally:
            os.kill(pid, signal.SIGCONT)
        t_cont = time.monotonic()
    evicted = {n: round(recorder.first_without(n, old_uuid, t0) - t0, 3) for n in others}
    # After SIGCONT: sample whether it serves (alive) and as whom, until it has a new UUID.
    samples = []

    def rejoined() -> bool:
        ready = get_json(f"{mn_pods.url(victim, ip)}/readyz", timeout=5)
        ring = mn_pods.ring(victim, ip)
        samples.append((ready["checks"]["alive"], ring["self"], ring["state"]))
        return ring["self"] != old_uuid and ring["state"] == "running"

    wait_for("the stopped MN to rejoin under a new UUID", rejoined, 60, interval=0.02, info=mn_pods.describe)
    figure("sigstop", evicted_after_s=evicted, rejoined_after_sigcont_s=round(time.monotonic() - t_cont, 2),
           samples=len(samples))
    served_as_old = [s for s in samples if s[0] and s[1] == old_uuid]
    assert not served_as_old, f"it served under its old UUID after eviction: {served_as_old}"
    log = mn_pods.log(victim)
    assert "fencing myself (lease lost: not renewed for" in log, log[-3000:]
    rings = mn_pods.wait_agreed(3, timeout=60)
    assert rings[victim]["self"] != old_uuid
    # It may have rejoined before it could renew again (then it joins without a Lease): it takes it next.
    wait_for("the rejoined MN to hold its Lease", lambda: mn_pods.lease(victim)["spec"]["holderIdentity"]
             == rings[victim]["self"], 10, info=mn_pods.describe)


def test_lease_expiry_alone_evicts_a_stopped_mn_and_it_fences_on_resume(mn_pods: MnPods) -> None:
    """With a DB timeout longer than the Lease, only the Lease notices a stall: its heartbeat row is still
    fresh when the MN resumes, so it must fence itself because its own renewal gap outgrew the Lease."""
    db_timeout = 4 * LEASE_DURATION
    mn_pods.extra_env = {"ZSTACK_HEARTBEAT_TIMEOUT": str(db_timeout)}
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    victim, others = mn_pods.names()[1], [mn_pods.names()[0], mn_pods.names()[2]]
    old_uuid, pid, ip = rings[victim]["self"], mn_pods.pid(victim), mn_pods.ip(victim)
    with RingRecorder(mn_pods, others) as recorder:
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for("the others to drop the stopped MN by Lease expiry",
                     lambda: all(recorder.first_without(n, old_uuid, t0) for n in others), db_timeout / 2,
                     info=mn_pods.describe)
            time.sleep(max(0.0, t0 + 2 * LEASE_DURATION - time.monotonic()))
        finally:
            os.kill(pid, signal.SIGCONT)
    dropped = {n: round(recorder.first_without(n, old_uuid, t0) - t0, 3) for n in others}
    figure("lease_expiry_convergence_s", **dropped)
    limit = LEASE_DURATION + HEARTBEAT_INTERVAL
    assert max(dropped.values()) <= limit, f"dropped after {dropped} s (> {limit} s)"
    assert all("ring changed (lease expired)" in mn_pods.log(n) for n in others)
    wait_for("the stopped MN to rejoin under a new UUID",
             lambda: mn_pods.ring(victim, ip)["self"] != old_uuid, 30, info=mn_pods.describe)
    # On resume it finds its renewal gap too long, or first reads the LEFT event of the MN that evicted it
    # through the DB when its Lease expired: either way it fences before serving again.
    log = mn_pods.log(victim)
    assert ("fencing myself (lease lost: not renewed for" in log
            or "fencing myself (evicted: another MN removed me (lease expired))" in log), log[-3000:]
    rings = mn_pods.wait_agreed(3, timeout=60)
    assert old_uuid not in next(iter(rings.values()))["members"]
    wait_for("the rejoined MN to hold its Lease", lambda: mn_pods.lease(victim)["spec"]["holderIdentity"]
             == rings[victim]["self"], 10, info=mn_pods.describe)


def test_mn_cut_off_from_the_api_server_alone_is_evicted_through_the_db_and_rejoins(mn_pods: MnPods) -> None:
    """One MN loses the API server (the node drops its packets to it); the others still reach it. They see its
    Lease expire and evict it through the DB, the channel it still reaches: it fences itself and rejoins under
    a new UUID without a Lease, which the DB alone admits everywhere."""
    victim = mn_pods.names()[1]
    mn_pods.deploy()
    rings = mn_pods.wait_agreed(3)
    others = [n for n in mn_pods.names() if n != victim]
    old_uuid, ip = rings[victim]["self"], mn_pods.ip(victim)
    assert mn_pods.lease(victim)["spec"]["holderIdentity"] == old_uuid
    partition = contextlib.ExitStack()
    served: list[tuple[float, bool, str, str]] = []  # (time, alive, self, state) of the victim

    def victim_view() -> tuple[str, str]:
        ready = get_json(f"{mn_pods.url(victim, ip)}/readyz", timeout=5)
        ring = mn_pods.ring(victim, ip)
        served.append((time.monotonic(), ready["checks"]["alive"], ring["self"], ring["state"]))
        return ring["self"], ring["state"]

    with RingRecorder(mn_pods, mn_pods.names()) as recorder:
        time.sleep(0.2)
        t0 = time.monotonic()
        partition.enter_context(mn_pods.cluster.api_server_unreachable_from(ip))
        limit = LEASE_DURATION + 3 * HEARTBEAT_INTERVAL
        wait_for("the others to drop the cut-off MN", lambda: all(
            recorder.first_without(n, old_uuid, t0) for n in others), limit + 10, info=mn_pods.describe)
        evicted = {n: round(recorder.first_without(n, old_uuid, t0) - t0, 3) for n in others}
        wait_for("the cut-off MN to rejoin under a new UUID",
                 lambda: victim_view()[0] != old_uuid and victim_view()[1] == "running", 60, interval=0.02,
                 info=mn_pods.describe)
        t_rejoined = time.monotonic()
        rings = mn_pods.wait_agreed(3, timeout=60)  # one ring again, with the API server still out of reach
    new_uuid = rings[victim]["self"]
    fenced_at = next(at for at, ring in recorder.samples[victim] if at > t0 and ring and (
        ring["self"] != old_uuid or ring["state"] != "running"))
    split_s = fenced_at - t0 - max(evicted.values())  # the others dropped it, it still served
    figure("api_partition", evicted_after_s=evicted, victim_fenced_after_s=round(fenced_at - t0, 3),
           split_s=round(split_s, 3), rejoined_after_s=round(t_rejoined - t0, 2))
    assert max(evicted.values()) <= limit, f"the others dropped the cut-off MN after {evicted} s (> {limit} s)"
    assert split_s <= 2 * HEARTBEAT_INTERVAL, f"it fenced {split_s:.2f} s after the others dropped it"
    assert new_uuid != old_uuid
    assert any("its Lease was not renewed" in mn_pods.log(n) for n in others), "no MN evicted it through the DB"
    log = mn_pods.log(victim)
    assert "fencing myself (evicted: another MN removed me (lease expired))" in log or \
        "fencing myself (row gone" in log, log[-3000:]
    # Once every MN dropped it (the victim by fencing), no ring counts the old UUID again, and the victim
    # never serves under it.
    settled = max(fenced_at, t0 + max(evicted.values()))
    late = [(n, at, ring["members"]) for n, samples in recorder.samples.items() for at, ring in samples
            if at > settled and ring and ring["state"] == "running" and old_uuid in ring["members"]]
    assert not late, f"the old UUID came back into a ring: {late[:3]}"
    served_as_old = [s for s in served if s[0] > fenced_at and s[1] and s[2] == old_uuid]
    assert not served_as_old, f"it served under its old UUID after its eviction: {served_as_old[:3]}"
    # The partition heals: it takes its pod's Lease over for the new UUID, and nothing else changes.
    fences_before = fences(mn_pods)
    partition.close()
    wait_for("the healed MN to hold its Lease under its new UUID",
             lambda: mn_pods.lease(victim)["spec"]["holderIdentity"] == new_uuid, 30, info=mn_pods.describe)
    time.sleep(2 * HEARTBEAT_INTERVAL)
    after = mn_pods.wait_agreed(3, timeout=30)
    assert {r["self"] for r in after.values()} == {r["self"] for r in rings.values()}
    assert fences(mn_pods) == fences_before, "an MN fenced itself after the partition healed"


ALLOWED = {
    ("leases", "coordination.k8s.io"): {"get", "list", "watch", "create", "update", "delete"},
    ("pods", ""): {"get"},
}
# Granted to every authenticated user by the default ClusterRoles (system:basic-user and friends).
DEFAULTS = {"selfsubjectaccessreviews.authorization.k8s.io", "selfsubjectrulesreviews.authorization.k8s.io",
            "selfsubjectreviews.authentication.k8s.io"}


def test_mn_service_account_can_do_exactly_what_is_listed(mn_pods: MnPods) -> None:
    who = f"--as=system:serviceaccount:{mn_pods.ns}:{SA}"

    def can(*args: str) -> bool:
        out = mn_pods.cluster.kubectl("auth", "can-i", *args, who, check=False)
        return out.stdout.strip() == "yes"

    ns = ["-n", mn_pods.ns]
    for verb in ALLOWED[("leases", "coordination.k8s.io")]:
        assert can(verb, "leases.coordination.k8s.io", *ns), f"cannot {verb} leases"
    assert can("get", "pods", *ns)
    denied = [("patch", "leases.coordination.k8s.io", *ns), ("deletecollection", "leases.coordination.k8s.io", *ns),
              ("list", "pods", *ns), ("watch", "pods", *ns), ("delete", "pods", *ns), ("create", "pods", *ns),
              ("get", "secrets", *ns), ("list", "configmaps", *ns), ("get", "nodes"),
              ("get", "leases.coordination.k8s.io", "-n", "kube-system"),
              ("create", "leases.coordination.k8s.io", "-n", "default"), ("get", "pods", "-n", "default")]
    allowed_wrongly = [d for d in denied if can(*d)]
    assert not allowed_wrongly, f"the MN ServiceAccount may do more than listed: {allowed_wrongly}"
    # The whole rule list in its namespace, as a SelfSubjectRulesReview by the ServiceAccount reports it.
    from kubernetes import client

    api_client = mn_pods.cluster.api_client()
    api_client.set_default_header("Impersonate-User", who.split("=", 1)[1])
    review = client.AuthorizationV1Api(api_client).create_self_subject_rules_review(
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
         "spec": {"namespace": mn_pods.ns}}, _preload_content=False)
    rules = json.loads(review.data)["status"]["resourceRules"]
    assert any("leases" in r["resources"] for r in rules), f"the review shows no Lease rule: {rules}"
    extra = []
    for rule in rules:
        for group in rule.get("apiGroups") or [""]:
            for resource in rule["resources"]:
                if f"{resource}.{group}" in DEFAULTS:
                    continue
                if rule.get("resourceNames") or set(rule["verbs"]) - ALLOWED.get((resource, group), set()):
                    extra.append(rule)
    assert not extra, f"unexpected rules for the MN ServiceAccount: {extra}"
