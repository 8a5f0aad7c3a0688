"""The cloud an MN manages: hosts, VMs, the allocator, durable jobs and the REST API.

`services.SERVICES` lists the service classes every MN hosts by default (before any `--service` extras):
`host` (host jobs and the ping tracker), `vm` (VM jobs) and `api` (the REST routes and the job sweeper).

Tuning, by environment variable, read once at start into `Settings.cloud` (settings.py; defaults in brackets):
ZSTACK_SIM_LATENCY [0.005 s per agent call], ZSTACK_SIM_FAILURE_RATE [0], ZSTACK_SIM_PING_FAILURE_RATE [0],
ZSTACK_HOST_PING_INTERVAL [1 s], ZSTACK_HOST_PING_FAILURES [3], ZSTACK_JOB_SWEEP_INTERVAL [2 s],
ZSTACK_JOB_PENDING_GRACE [10 s].
"""
