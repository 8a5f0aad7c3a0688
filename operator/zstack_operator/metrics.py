"""The operator's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from zstack_operator.kubeapi import KINDS

RECONCILES = Counter("zstack_operator_reconciles", "Reconciles of ZStackClusters, by result (ok, error, paused)",
                     ["result"])
RECONCILE_SECONDS = Histogram("zstack_operator_reconcile_duration_seconds", "Time to reconcile one ZStackCluster",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RECONCILE_ERRORS = Counter("zstack_operator_reconcile_errors", "Failed reconciles, by the kind of child that failed",
                           ["kind"])
CLUSTERS = Gauge("zstack_operator_clusters", "ZStackClusters this operator manages")
READY_CLUSTERS = Gauge("zstack_operator_clusters_ready", "Managed ZStackClusters that are Ready and not progressing")
LEADER = Gauge("zstack_operator_leader", "1 while this replica leads (reconciles), 0 on standby")
STATUS_UPDATES = Counter("zstack_operator_status_updates", "Status patches written (only on change)")

RESULTS = ("ok", "error", "paused")
# A failed reconcile is counted under the kind of its first failed child, or "API group" when the monitoring API
# could not be asked (reconcile.py); Pods, Events and ZStackClusters are read or written, never reconciled.
ERROR_KINDS = ("API group", *sorted(set(KINDS) - {"Pod", "Event", "ZStackCluster"}))


def initialise() -> None:
    """Export the bounded label sets at 0 from the start, so counters that did not fire yet read 0, not absent."""
    for result in RESULTS:
        RECONCILES.labels(result)
    for kind in ERROR_KINDS:
        RECONCILE_ERRORS.labels(kind)


initialise()  # once per process, on import: the operator's metrics exist before its first reconcile
