"""Tables of the cloud (hosts, VMs, jobs, their history) and the migration step that creates them.

Capacity is guarded twice: the allocator's conditional UPDATE never oversubscribes, and a CHECK
constraint makes the database refuse it anyway. `vm_history` records every VM state change with the
job that made it, in the same transaction, so "no job changed a VM twice" can be checked.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

HOST_STATES = ("Connected", "Disconnected")
VM_STATES = ("Created", "Starting", "Running", "Stopping", "Stopped", "Migrating", "Destroyed")
JOB_STATES = ("Pending", "Running", "Succeeded", "Failed")

_DDL = """
CREATE TABLE IF NOT EXISTS hosts (
    uuid varchar(32) PRIMARY KEY,
    name varchar(128) NOT NULL,
    cpu_capacity integer NOT NULL,
    cpu_used integer NOT NULL DEFAULT 0,
    memory_capacity bigint NOT NULL,
    memory_used bigint NOT NULL DEFAULT 0,
    state varchar(16) NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_ping_at timestamptz,
    tracked_by varchar(32),
    CONSTRAINT hosts_capacity CHECK (cpu_used BETWEEN 0 AND cpu_capacity
                                     AND memory_used BETWEEN 0 AND memory_capacity)
);
CREATE TABLE IF NOT EXISTS vm_instances (
    uuid varchar(32) PRIMARY KEY,
    name varchar(128) NOT NULL,
    cpu integer NOT NULL,
    memory bigint NOT NULL,
    host_uuid varchar(32),
    migrate_to varchar(32),
    state varchar(16) NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    job_id varchar(32),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS vm_instances_host ON vm_instances (host_uuid);
CREATE TABLE IF NOT EXISTS jobs (
    id varchar(32) PRIMARY KEY,
    operation varchar(32) NOT NULL,
    resource_uuid varchar(32) NOT NULL,
    parameters jsonb NOT NULL DEFAULT '{}',
    state varchar(16) NOT NULL DEFAULT 'Pending',
    result jsonb,
    error jsonb,
    mn varchar(32),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS jobs_resource ON jobs (resource_uuid, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (updated_at) WHERE state IN ('Pending', 'Running');
CREATE TABLE IF NOT EXISTS vm_history (
    id bigserial PRIMARY KEY,
    vm_uuid varchar(32) NOT NULL,
    job_id varchar(32) NOT NULL,
    from_state varchar(16),
    to_state varchar(16) NOT NULL,
    version bigint NOT NULL,
    mn varchar(32) NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS vm_history_vm ON vm_history (vm_uuid, version);
CREATE TABLE IF NOT EXISTS sim_host_faults (
    host_uuid varchar(32) PRIMARY KEY,
    ping_fails boolean NOT NULL DEFAULT true
);
"""


def v2_cloud(conn: Connection) -> None:
    """Hosts, VM instances, jobs, VM history and the simulator's fault table."""
    for statement in _DDL.split(";"):
        if statement.strip():
            conn.execute(text(statement))


_SCALE_DDL = """
ALTER TABLE hosts ALTER COLUMN name TYPE varchar(255);
ALTER TABLE vm_instances ALTER COLUMN name TYPE varchar(255);
CREATE INDEX IF NOT EXISTS vm_instances_state_uuid ON vm_instances (state, uuid);
CREATE INDEX IF NOT EXISTS vm_instances_host_uuid ON vm_instances (host_uuid, uuid);
DROP INDEX IF EXISTS vm_instances_host;
CREATE INDEX IF NOT EXISTS jobs_created_id ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_state_created_id ON jobs (state, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_resource_created_id ON jobs (resource_uuid, created_at, id);
DROP INDEX IF EXISTS jobs_created;
DROP INDEX IF EXISTS jobs_resource;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS vm_instances_destroyed ON vm_instances (uuid) WHERE state = 'Destroyed';
-- the allocator's candidates (most free CPU first) from an index, not a sort of every host per create
-- the host tracker's read of hosts added since its last read
CREATE INDEX IF NOT EXISTS hosts_created ON hosts (created_at);
CREATE INDEX IF NOT EXISTS hosts_free_cpu ON hosts ((cpu_capacity - cpu_used) DESC, uuid) WHERE state = 'Connected';
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key varchar(255) PRIMARY KEY,
    fingerprint varchar(64) NOT NULL,
    job_id varchar(32) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at)
"""


def v4_api_scale(conn: Connection) -> None:
    """Names of up to 255 characters; keyset-paging, retention and allocator indexes; idempotency keys."""
    for statement in _SCALE_DDL.split(";"):
        if statement.strip():
            conn.execute(text(statement))
