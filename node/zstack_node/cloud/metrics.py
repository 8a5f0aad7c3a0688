"""Prometheus metrics of the cloud services (served with the runtime's on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from zstack_node.cloud.repo import TERMINAL
from zstack_node.cloud.routes import ROUTES

API_REQUESTS = Counter("zstack_api_requests_total", "HTTP API requests, by operation and status code",
                       ["operation", "code"])
IDEMPOTENT_REPLAYS = Counter("zstack_api_idempotent_replays_total",
                             "Requests answered with the job of an earlier request with the same Idempotency-Key")
LONG_POLLS = Gauge("zstack_api_long_polls", "Requests waiting on a job now (GET /v1/jobs/{id}?wait=)")
LONG_POLLS_REFUSED = Counter("zstack_api_long_polls_refused_total", "Waiting requests refused with 429: too many")
PURGED = Counter("zstack_retention_purged_total", "Rows this MN purged after their retention, by kind", ["kind"])
JOB_SECONDS = Histogram(
    "zstack_job_seconds", "Time from a job's acceptance to its terminal state, on the MN that finished it",
    ["operation"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
JOBS_FINISHED = Counter("zstack_jobs_finished_total", "Jobs this MN drove to a terminal state",
                        ["operation", "state"])
JOBS_IN_FLIGHT = Gauge("zstack_jobs_in_flight", "Jobs this MN is running now")
JOBS_SWEPT = Counter("zstack_jobs_swept_total", "Abandoned jobs (MN gone or message lost) this MN took over")
STALE_WRITES = Counter("zstack_stale_writes_total", "Fenced writes that lost a race and were retried",
                       ["operation"])
TAKEOVER_RESOURCES = Counter(
    "zstack_takeover_resources_total", "Resources this MN gained when another MN left the ring", ["kind"]
)
TAKEOVERS = Counter("zstack_cloud_takeovers_total", "MNs that left while this MN served, by resource kind counted",
                    ["kind"])
HOSTS_TRACKED = Gauge("zstack_hosts_tracked", "Hosts this MN owns and pings")
HOST_PINGS = Counter("zstack_host_pings_total", "Host pings by outcome", ["outcome"])
HOSTS_DISCONNECTED = Counter("zstack_hosts_disconnected_total", "Hosts this MN marked Disconnected")
# Per tracker ping: the time it was sent minus the time it was due. A tracked host is due at its slot, one
# interval after its previous slot (slots are spread over the interval by a hash of its UUID); a host this MN
# just gained (join, takeover) is due the moment the MN learns it owns it, and a host just created one
# interval after the MN found it. Manual pings are not counted.
HOST_PING_LAG = Histogram(
    "zstack_host_ping_lag_seconds",
    "How late each tracker ping of a host was sent, against the time it was due (its slot in the ping interval, "
    "or the moment this MN gained the host)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)

PURGE_KINDS = ("job", "vm", "idempotency_key")
TAKEOVER_KINDS = ("host", "vm")  # what HostService and VmService count when an MN leaves
PING_OUTCOMES = ("ok", "failed")


def initialise() -> None:
    """Export the bounded label sets at 0 from the start: a counter that did not fire yet reads 0 instead of being
    absent, and its first increment shows in rate() (a series born at 1 shows none)."""
    for route in ROUTES:
        if route.handler:  # served by the ApiService (the runtime serves the others)
            API_REQUESTS.labels(route.operation, str(route.success[0]))
        if route.success[1] == "JobAccepted":
            JOB_SECONDS.labels(route.operation)
            for state in TERMINAL:
                JOBS_FINISHED.labels(route.operation, state)
    for kind in TAKEOVER_KINDS:
        TAKEOVERS.labels(kind)
        TAKEOVER_RESOURCES.labels(kind)
    for outcome in PING_OUTCOMES:
        HOST_PINGS.labels(outcome)
    for kind in PURGE_KINDS:
        PURGED.labels(kind)
