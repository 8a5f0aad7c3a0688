"""Turn an Observation into the ZStackCluster's status: counts, the agreed ring and the conditions.

Pure functions: the caller decides when to write (only when something but timestamps changed).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from zstack_operator.cluster import Cluster
from zstack_operator.observe import Observation, ordinal


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class ReconcileState:
    """What the last reconcile of this cluster left behind."""

    observed_generation: int | None = None
    error: str | None = None


def build_status(cluster: Cluster, seen: Observation, last: ReconcileState,
                 previous: dict[str, Any] | None, now: dt.datetime | None = None) -> dict[str, Any]:
    """The full status object; lastTransitionTime is kept from `previous` for conditions that did not flip."""
    sts_status = (seen.statefulset or {}).get("status") or {}
    ring_size = len(seen.ring_members)
    status: dict[str, Any] = {
        "replicas": int(sts_status.get("replicas", 0)),
        "readyReplicas": int(sts_status.get("readyReplicas", 0)),
        "selector": cluster.mn_selector,
        "broker": cluster.mode("broker"),
        "database": cluster.mode("database"),
        "ring": {"summary": f"{ring_size}/{cluster.replicas}", "size": ring_size, "agreed": seen.ring_agreed,
                 "members": seen.ring_members, "epochs": seen.epochs},
    }
    observed = last.observed_generation if last.observed_generation is not None else \
        (previous or {}).get("observedGeneration")
    if observed is not None:
        status["observedGeneration"] = observed
    status["conditions"] = _with_times(conditions(cluster, seen, last), (previous or {}).get("conditions") or [],
                                       observed, now or dt.datetime.now(dt.UTC))
    return status


def conditions(cluster: Cluster, seen: Observation, last: ReconcileState) -> list[Condition]:
    """The six conditions, each with a CamelCase reason and a message a user can act on."""
    broker = _dependency(cluster, seen, "broker", seen.broker_statefulset)
    database = _dependency(cluster, seen, "database", seen.database_statefulset)
    progressing = _progressing(cluster, seen)
    degraded = _degraded(seen, last)
    paused = Condition("ReconciliationPaused", cluster.paused, "Paused" if cluster.paused else "Reconciling",
                       "the annotation zstack.io/pause-reconciliation is \"true\": children are left as they are"
                       if cluster.paused else "children are reconciled with the spec")
    return [_ready(cluster, seen, broker, database, progressing, degraded), progressing, degraded, broker,
            database, paused]


def _ready(cluster: Cluster, seen: Observation, broker: Condition, database: Condition, progressing: Condition,
           degraded: Condition) -> Condition:
    want = cluster.replicas
    ready = int(((seen.statefulset or {}).get("status") or {}).get("readyReplicas", 0))
    if want == 0 and not seen.pods:
        return Condition("Ready", False, "ScaledToZero", "replicas is 0: no MN runs; the broker, the database "
                         "and all data are kept; scale up to serve again")
    if degraded.status:
        return Condition("Ready", False, degraded.reason, degraded.message)
    if progressing.status:
        return Condition("Ready", False, progressing.reason, progressing.message)
    for dependency in (broker, database):
        if not dependency.status:
            return Condition("Ready", False, dependency.reason, dependency.message)
    if ready == want and len(seen.ring_members) == want and seen.ring_agreed:
        return Condition("Ready", True, "Ready", f"{want} MN(s) ready, all in one ring")
    return Condition("Ready", False, "Converging", f"{ready}/{want} MN(s) ready, {len(seen.ring_members)} in the ring")


def _progressing(cluster: Cluster, seen: Observation) -> Condition:
    want = cluster.replicas
    if cluster.paused:
        return Condition("Progressing", False, "Paused", "reconciliation is paused: what runs may differ from "
                         "the spec until the annotation zstack.io/pause-reconciliation is removed")
    if seen.statefulset is None:
        return Condition("Progressing", True, "Creating", f"creating the MN StatefulSet {cluster.mn}")
    sts = seen.statefulset
    sts_status = sts.get("status") or {}
    existing = [p for p in seen.pods if not p.terminating]
    leaving = [p.name for p in seen.pods if p.terminating or ordinal(p.name) >= want]
    ready = sum(1 for p in existing if p.ready and ordinal(p.name) < want)
    ring = len(seen.ring_members)
    if leaving:
        return Condition("Progressing", True, "ScalingDown",
                         f"{len(leaving)} MN(s) leaving the ring ({', '.join(leaving)}); ring {ring}/{want}")
    if int(sts_status.get("observedGeneration", 0)) < int(sts["metadata"].get("generation", 0)):
        return Condition("Progressing", True, "Updating", "the StatefulSet controller has not seen the change yet")
    if ready < want:
        return Condition("Progressing", True, "ScalingUp", f"{ready}/{want} MN(s) ready; ring {ring}/{want}")
    if sts_status.get("updateRevision") and sts_status.get("currentRevision") != sts_status.get("updateRevision"):
        updated = int(sts_status.get("updatedReplicas", 0))
        return Condition("Progressing", True, "RollingUpdate", f"{updated}/{want} MN(s) run the new pod template")
    if ready and not any(p.ring for p in seen.pods):
        return Condition("Progressing", True, "RingUnobservable",
                         f"{ready} MN(s) ready but none answers on /v1/cluster/ring at its pod IP, port "
                         f"{cluster.api_port}: the operator must reach the MN pods (check NetworkPolicies)")
    if ring != want or not seen.ring_agreed:
        return Condition("Progressing", True, "RingConverging", f"ring {ring}/{want}; the MNs' views differ"
                         if not seen.ring_agreed else f"ring {ring}/{want}")
    return Condition("Progressing", False, "Stable", f"{want} MN(s) ready, ring {ring}/{want}")


def _degraded(seen: Observation, last: ReconcileState) -> Condition:
    if last.error:
        return Condition("Degraded", True, "ReconcileFailed", last.error)
    failing = [f"{p.name}: {p.failure}" for p in seen.pods if p.failure]
    if failing:
        return Condition("Degraded", True, "PodFailing", "; ".join(failing))
    return Condition("Degraded", False, "AsExpected", "no errors")


def _dependency(cluster: Cluster, seen: Observation, dependency: str, sts: dict[str, Any] | None) -> Condition:
    kind = "BrokerReady" if dependency == "broker" else "DatabaseReady"
    what = "RabbitMQ" if dependency == "broker" else "PostgreSQL"
    if cluster.mode(dependency) == "managed":
        if sts is None:
            return Condition(kind, False, "Creating", f"creating the managed {what} {cluster.child(dependency)}")
        if int((sts.get("status") or {}).get("readyReplicas", 0)) >= 1:
            return Condition(kind, True, "Ready", f"the managed {what} is ready")
        return Condition(kind, False, "NotReady", f"the managed {what} pod is not ready yet")
    # External: the operator never reads the URL; an MN's readiness (/readyz) proves it can connect.
    ref = cluster.section(dependency, "external").get("secretRef") or {}
    if any(p.ready for p in seen.pods):
        return Condition(kind, True, "Connected", f"MNs connected to the external {what} "
                         f"(Secret {ref.get('name')}, key {ref.get('key', 'url')})")
    failing = [p.failure for p in seen.pods if p.failure]
    message = failing[0] if failing else "no MN is ready yet to prove the connection"
    return Condition(kind, False, "NotConnected", f"external {what} (Secret {ref.get('name')}): {message}")


def _with_times(current: list[Condition], previous: list[dict[str, Any]], generation: int | None,
                now: dt.datetime) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in previous}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    result = []
    for cond in current:
        status = "True" if cond.status else "False"
        old = before.get(cond.type) or {}
        entry = {"type": cond.type, "status": status, "reason": cond.reason, "message": cond.message,
                 "lastTransitionTime": old.get("lastTransitionTime", stamp) if old.get("status") == status
                 else stamp}
        if generation is not None:
            entry["observedGeneration"] = generation
        result.append(entry)
    return result


def same_status(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal but for condition timestamps: then there is nothing to write."""
    def strip(status: dict[str, Any] | None) -> Any:
        status = dict(status or {})
        status["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                for c in status.get("conditions") or []]
        return status
    return strip(a) == strip(b)

