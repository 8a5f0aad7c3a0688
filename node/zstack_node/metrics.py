"""Prometheus metrics of one MN, served on its HTTP port at /metrics."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

MESSAGES_SENT = Counter("zstack_bus_messages_sent_total", "Messages this MN published", ["service", "kind"])
MESSAGES_RECEIVED = Counter(
    "zstack_bus_messages_received_total", "Messages this MN consumed", ["service", "kind"]
)
MESSAGES_REJECTED = Counter(
    "zstack_bus_messages_rejected_total",
    "Messages dead-lettered or refused, by reason (malformed, no_route, hop_limit, expired, ...)",
    ["service", "reason"],
)
CALL_SECONDS = Histogram(
    "zstack_bus_call_seconds",
    "Latency of bus calls made by this MN, from publish to reply",
    ["service"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REROUTES = Counter(
    "zstack_bus_reroutes_total", "Messages re-routed to a new owner after their MN left", ["service", "cause"]
)
RING_MEMBERS = Gauge("zstack_ring_members", "MNs in this MN's copy of the ring")
RING_EPOCH = Gauge("zstack_ring_epoch", "Fingerprint of this MN's ring member set; equal on MNs that agree")
RING_CHANGES = Counter("zstack_ring_changes_total", "Times this MN rebuilt its ring", ["cause"])
EVICTIONS = Counter(
    "zstack_membership_evictions_total",
    "MNs this MN evicted from the table, by cause: heartbeat (a stale row) or lease (an expired Lease)",
    ["cause"],
)
FENCES = Counter("zstack_membership_fences_total", "Times this MN fenced itself (and took a new UUID)", ["reason"])
SUSPENSIONS = Counter(
    "zstack_membership_suspensions_total",
    "Times this MN suspended itself (stopped acting, kept its UUID), by reason",
    ["reason"],
)
NODE_STATE = Gauge("zstack_node_state", "1 for this MN's current state, 0 for the others", ["state"])
TAKEOVERS = Counter(
    "zstack_takeovers_total", "Takeover hooks run on this MN, by service and event", ["service", "event"]
)
HEARTBEAT_AGE = Gauge("zstack_heartbeat_age_seconds", "Seconds since this MN last wrote its heartbeat")
LEASE_RENEW_SECONDS = Histogram(
    "zstack_lease_renew_seconds",
    "Latency of this MN's Lease renewals (successful or not)",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
LEASE_RENEW_FAILURES = Counter(
    "zstack_lease_renew_failures_total",
    "Lease renewals that failed: unreachable (the API server did not answer usefully) or lost (fenced)",
    ["reason"],
)
LEASE_EVENTS = Counter(
    "zstack_lease_events_total",
    "Lease watch events handled, by effect on this MN's ring (none: a renewal or a repeat)",
    ["effect"],
)
MEMBERS_BY_SOURCE = Gauge(
    "zstack_membership_members",
    "MNs alive by source at the last reconcile: db (fresh row), lease (unexpired Lease), both",
    ["source"],
)
LEASE_TRUSTED = Gauge(
    "zstack_lease_view_trusted",
    "1 while this MN's Lease view counts (own renewals succeed and come back on its synced watch)",
)
# The TLS series exist only on an MN serving HTTPS: export_tls() registers them.
TLS_CERT_EXPIRY = Gauge(
    "zstack_tls_certificate_expiry_timestamp_seconds",
    "notAfter of the certificate this MN serves on its HTTPS port, as a Unix time",
    registry=None,
)
TLS_RELOADS = Counter(
    "zstack_tls_reloads_total",
    "Loads of changed TLS files: success, or error (the previous certificate is still served)",
    ["result"],
    registry=None,
)
NODE_INFO = Gauge("zstack_node_info", "Identity of this MN (value 1)", ["uuid", "hostname", "cluster"])

# The fixed label values the runtime counts with (see the call sites in bus/cloudbus.py, node.py, membership/leases.py).
REJECT_REASONS = ("malformed", "no_route", "hop_limit", "expired", "unknown_type", "reply_to_gone")
REROUTE_CAUSES = ("queue_gone", "target_left", "not_owner")
TAKEOVER_EVENTS = ("node_joined", "node_left")
EVICTION_CAUSES = ("heartbeat", "lease")
FENCE_REASONS = ("evicted", "lease lost")
SUSPEND_REASONS = ("broker unreachable", "database unreachable", "heartbeat overdue")
LEASE_RENEW_FAILURE_REASONS = ("unreachable", "lost")
LEASE_EFFECTS = ("none", "ring_change")


def initialise(services: Iterable[str], leases: bool) -> None:
    """Export the bounded label sets at 0 from the start, for the services this MN registers: a counter
    that did not fire yet then reads 0 (and rates 0) instead of being absent ("No data" on a dashboard).
    Call latency is left to the callers (a histogram without observations is NaN on every quantile panel);
    the Lease series only exist on MNs that hold Leases ("not in use" is not "0 failures")."""
    for service in services:
        for reason in REJECT_REASONS:
            MESSAGES_REJECTED.labels(service, reason)
        for cause in REROUTE_CAUSES:
            REROUTES.labels(service, cause)
        for event in TAKEOVER_EVENTS:
            TAKEOVERS.labels(service, event)
    lease_only = (("lease",), ("lease lost",))
    for metric, values, lease_values in ((EVICTIONS, EVICTION_CAUSES, lease_only[0]),
                                         (FENCES, FENCE_REASONS, lease_only[1])):
        for value in values:
            if leases or value not in lease_values:
                metric.labels(value)
    for reason in SUSPEND_REASONS:
        SUSPENSIONS.labels(reason)
    if leases:
        for metric, values in ((LEASE_RENEW_FAILURES, LEASE_RENEW_FAILURE_REASONS), (LEASE_EVENTS, LEASE_EFFECTS)):
            for value in values:
                metric.labels(value)


@functools.cache
def export_tls() -> None:
    """Serve the TLS series on /metrics (once per process; an MN without TLS has none)."""
    REGISTRY.register(TLS_CERT_EXPIRY)
    REGISTRY.register(TLS_RELOADS)


@functools.cache
def child(metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
    """`metric.labels(*labels)`, cached: the hot path pays a dict lookup, not a locked one.

    Callers pass only label values from a bounded set (known services, fixed kinds and reasons).
    """
    return metric.labels(*labels)


def count(metric: Counter, *labels: str) -> None:
    child(metric, *labels).inc()
