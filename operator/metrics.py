"""The operator's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

for _result in ("ok", "error", "paused"):
    RECONCILES.labels(_result)
