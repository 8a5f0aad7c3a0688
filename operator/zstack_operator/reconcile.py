"""Reconcile one ZStackCluster: make its children match the spec. Level-triggered and idempotent.

Children are written by server-side apply under one field manager, so an unchanged child is not rewritten
(its resourceVersion stays put) and fields other managers own (e.g. an HPA's) are left alone. Generated
Secrets are created once and never overwritten. Optional children that the spec turns off are deleted,
but only when this cluster owns them. Every child has the cluster as its controller owner, so deleting
the ZStackCluster lets the garbage collector remove them all (PVCs of managed databases excepted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zstack_kube.errors import ApiError
from zstack_operator import managed, mn, netpol, tls
from zstack_operator.cluster import Cluster
from zstack_operator.credentials import generated_secrets
from zstack_operator.events import EventRecorder
from zstack_operator.kubeapi import Kube

log = logging.getLogger(__name__)
MONITORING = "monitoring.coreos.com/v1"


class Stopping(Exception):
    """This replica no longer leads (or is shutting down): the next leader reconciles."""


class ReconcileError(Exception):
    """Some children could not be written; the message names each and the API server's answer."""

    def __init__(self, failures: list[tuple[str, str, ApiError]]) -> None:
        super().__init__("; ".join(f"{kind} {name}: {cause}" for kind, name, cause in failures))
        self.failures = failures
        self.kind = failures[0][0]


@dataclass
class Outcome:
    """What one reconcile changed, for Events and logs."""

    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    scaled: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)


def desired_children(cluster: Cluster, monitoring: dict[str, bool],
                     mn_cluster_role: str = mn.MN_CLUSTER_ROLE) -> list[dict[str, Any]]:
    """Every child the spec asks for, in apply order (what pods need comes before the pods)."""
    config = mn.config_map(cluster)
    # Policies come before the pods they guard, so that no pod ever runs unguarded.
    objects = [config, *mn.access(cluster, mn_cluster_role), *mn.services(cluster), *netpol.policies(cluster)]
    if cluster.mode("broker") == "managed":
        objects += managed.rabbitmq(cluster)
    if cluster.mode("database") == "managed":
        objects += managed.postgresql(cluster)
    objects.append(mn.statefulset(cluster, config))
    if cluster.section("podDisruptionBudget").get("enabled", True):
        objects.append(mn.pod_disruption_budget(cluster))
    metrics = cluster.section("metrics")
    if metrics.get("serviceMonitor") and monitoring.get("servicemonitors"):
        objects.append(mn.service_monitor(cluster))
    if metrics.get("podMonitor") and monitoring.get("podmonitors"):
        objects.append(mn.pod_monitor(cluster))
    return objects


def optional_children(cluster: Cluster) -> list[tuple[str, str]]:
    """(kind, name) of every child some spec may turn off: candidates for pruning."""
    return [("PodDisruptionBudget", cluster.mn), ("ServiceMonitor", cluster.mn), ("PodMonitor", cluster.mn),
            ("StatefulSet", cluster.child("rabbitmq")), ("Service", cluster.child("rabbitmq")),
            ("StatefulSet", cluster.child("postgresql")), ("Service", cluster.child("postgresql")),
            *(("NetworkPolicy", name) for name in netpol.names(cluster))]


def reconcile(kube: Kube, cluster: Cluster, events: EventRecorder,
              should_stop: Callable[[], bool] = lambda: False, mn_cluster_role: str = mn.MN_CLUSTER_ROLE) -> Outcome:
    """Apply the desired children, create missing Secrets, prune what the spec turned off.

    A child that fails does not stop the others (a broken managed database must not block `kubectl scale`);
    the failures are raised together at the end. `should_stop` is asked before every write: once this
    replica stops leading, not one more child is written."""
    outcome = Outcome()
    failures: list[tuple[str, str, ApiError]] = []

    def attempt(kind: str, name: str, call: Any, *args: Any) -> Any:
        if should_stop():
            raise Stopping
        try:
            return call(*args)
        except ApiError as exc:
            failures.append((kind, name, exc))
            return None

    monitoring = _monitoring_apis(kube, cluster, outcome)
    for secret in generated_secrets(cluster):
        if attempt("Secret", secret["metadata"]["name"], kube.create_once, secret):
            outcome.created.append(f"Secret {secret['metadata']['name']}")

    if tls.generated(cluster):
        _create_certificate(kube, cluster, outcome, attempt)

    before = attempt("StatefulSet", cluster.mn, kube.get, "StatefulSet", cluster.namespace, cluster.mn)
    wanted = desired_children(cluster, monitoring, mn_cluster_role)
    for obj in wanted:
        attempt(obj["kind"], obj["metadata"]["name"], kube.apply, obj)
    if before is None and not failures:
        outcome.created.append(f"StatefulSet {cluster.mn} with its ConfigMap, Services and RBAC")
    elif before is not None and (old := int(before["spec"].get("replicas", 1))) != cluster.replicas:
        outcome.scaled = (old, cluster.replicas)

    keep = {(o["kind"], o["metadata"]["name"]) for o in wanted}
    for kind, name in optional_children(cluster):
        if (kind, name) in keep:
            continue
        existing = attempt(kind, name, kube.get, kind, cluster.namespace, name)
        if existing and _owned(existing, cluster) and attempt(kind, name, kube.delete, kind, cluster.namespace, name):
            outcome.deleted.append(f"{kind} {name}")
    _announce(cluster, outcome, events)
    if failures:
        raise ReconcileError(failures)
    return outcome


def _create_certificate(kube: Kube, cluster: Cluster, outcome: Outcome, attempt: Callable[..., Any]) -> None:
    """Create the API's Secret `<cluster>-api-tls` unless it exists, and then the CA's ConfigMap.

    A certificate is issued at every reconcile (well under a millisecond of CPU) because the operator cannot
    read Secrets to learn whether one exists; the API server keeps the first and refuses the rest."""
    issued = tls.issue(cluster)
    secret = tls.secret(cluster, issued)
    name = secret["metadata"]["name"]
    if attempt("Secret", name, kube.create_once, secret):
        outcome.created.append(f"Secret {name}")
        config_map = tls.ca_config_map(cluster, issued)
        attempt("ConfigMap", config_map["metadata"]["name"], kube.apply, config_map)


def _announce(cluster: Cluster, outcome: Outcome, events: EventRecorder) -> None:
    if outcome.created:
        events.normal(cluster, "Created", "created " + ", ".join(outcome.created))
    if outcome.scaled:
        old, new = outcome.scaled
        verb = "up" if new > old else "down"
        detail = "" if new > old else f"; MNs {cluster.mn}-{new}..{old - 1} leave the ring gracefully"
        events.normal(cluster, "Scaling", f"scaling {verb} from {old} to {new} MNs{detail}")
    if outcome.deleted:
        events.normal(cluster, "Deleted", "deleted " + ", ".join(outcome.deleted) + " (turned off in the spec)")


def _monitoring_apis(kube: Kube, cluster: Cluster, outcome: Outcome) -> dict[str, bool]:
    """Which monitoring.coreos.com kinds the API server serves (asked only when the spec wants one)."""
    metrics = cluster.section("metrics")
    found = {}
    for plural, wanted in (("servicemonitors", metrics.get("serviceMonitor")),
                           ("podmonitors", metrics.get("podMonitor"))):
        try:
            found[plural] = bool(wanted) and kube.has_api(MONITORING, plural)
        except ApiError as exc:
            raise ReconcileError([("API group", MONITORING, exc)]) from None
        if wanted and not found[plural]:
            outcome.notes.append(f"spec.metrics asks for a {plural[:-1]} but the API server has no {MONITORING} "
                                 f"{plural}: install the Prometheus Operator's CRDs; skipped for now")
    return found


def _owned(obj: dict[str, Any], cluster: Cluster) -> bool:
    return any(ref.get("uid") == cluster.uid for ref in obj["metadata"].get("ownerReferences") or [])
