"""Jobs left behind (MN dead mid-job, message lost) are finished by the resource's owner, exactly once."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import create_engine

from tests.cloud.conftest import duplicate_changes, host_accounting
from zstack_node.cloud import repo
from zstack_node.db import migrate
from zstack_node.schema import MIGRATIONS

pytestmark = pytest.mark.slow


def insert_job(cloud, operation: str, resource: str, *, state: str = "Pending", mn: str | None = None,
               parameters: dict | None = None) -> str:
    job_id = uuid.uuid4().hex
    cloud.sql("INSERT INTO jobs (id, operation, resource_uuid, parameters, state, mn)"
              " VALUES (:j, :o, :r, CAST(:p AS jsonb), :s, :m)",
              j=job_id, o=operation, r=resource, p=json.dumps(parameters or {}), s=state, m=mn)
    return job_id


def test_abandoned_jobs_are_finished_by_the_owner_once(cloud):
    (node,) = cloud.start(1, env={"ZSTACK_JOB_PENDING_GRACE": "1", "ZSTACK_JOB_SWEEP_INTERVAL": "0.5"})
    api = cloud.api()
    api.add_host(cpu=8, memory=8192)
    vms = [api.run("POST", "/v1/vms", {"name": f"v{i}", "cpu": 1, "memory": 256})["result"] for i in range(3)]
    dead = uuid.uuid4().hex  # an MN that is not in the ring

    # 1. Message lost: a Pending job without an MN is driven after the grace period.
    lost = insert_job(cloud, "vm.stop", vms[0]["uuid"])
    # 2. Its MN died after step 1 (VM Stopping, stamped with the job): resumed, not re-applied.
    midway = insert_job(cloud, "vm.stop", vms[1]["uuid"], state="Running", mn=dead)
    cloud.sql("UPDATE vm_instances SET state = 'Stopping', job_id = :j, version = version + 1 WHERE uuid = :u",
              j=midway, u=vms[1]["uuid"])
    # 3. A create whose MN died after placing the VM: the capacity it took is kept, not taken twice.
    new_vm = uuid.uuid4().hex
    create = insert_job(cloud, "vm.create", new_vm, state="Running", mn=dead,
                        parameters={"name": "half", "cpu": 2, "memory": 512})
    host = api.ok("GET", "/v1/hosts", 200)["hosts"][0]
    cloud.sql("UPDATE hosts SET cpu_used = cpu_used + 2, memory_used = memory_used + 512 WHERE uuid = :h",
              h=host["uuid"])
    cloud.sql("INSERT INTO vm_instances (uuid, name, cpu, memory, host_uuid, state, job_id)"
              " VALUES (:u, 'half', 2, 512, :h, 'Starting', :j)", u=new_vm, h=host["uuid"], j=create)
    # 4. Already finished: a job that reached its end is never run again.
    done = insert_job(cloud, "vm.destroy", vms[2]["uuid"], state="Succeeded", mn=dead)
    # 5. Claimed by this very MN, which no longer runs it (say a run gave up while the DB was down).
    stuck = insert_job(cloud, "vm.reboot", vms[2]["uuid"], state="Running", mn=node.uuid)

    for job_id, state in [(lost, "Stopped"), (midway, "Stopped"), (create, "Running"), (stuck, "Running")]:
        job = api.wait(job_id, 30)
        assert job["state"] == "Succeeded" and job["mn"] == node.uuid, job
        assert job["result"]["state"] == state
    assert api.ok("GET", f"/v1/vms/{vms[2]['uuid']}", 200)["state"] == "Running", f"job {done} ran again"
    history = cloud.sql("SELECT to_state FROM vm_history WHERE job_id = :j ORDER BY version", j=midway)
    assert [r.to_state for r in history] == ["Stopped"], "the resumed stop went through Stopping again"
    assert duplicate_changes(cloud) == []
    assert host_accounting(cloud) == []
    assert api.ok("GET", f"/v1/hosts/{host['uuid']}", 200)["cpu_used"] == 5
    swept = api.request("GET", "/metrics").text
    assert "zstack_jobs_swept_total 4.0" in swept


def test_fences_stop_a_stale_runner(fresh_database):
    """Ownership moved mid-job: the old runner's writes fail with StaleWrite and change nothing."""
    engine = create_engine(fresh_database)
    migrate(engine, MIGRATIONS)
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO vm_instances (uuid, name, cpu, memory, state) VALUES ('%s', 'v', 1, 1,"
                             " 'Running')" % ("a" * 32))
        job = repo.insert_job(conn, "vm.stop", "a" * 32, {})
        assert repo.claim_job(conn, job.id, old, None) is not None
        vm = repo.get_vm(conn, "a" * 32)
    with engine.begin() as conn:  # the new owner takes the job over from the old runner
        assert repo.claim_job(conn, job.id, new, old) is not None
        assert repo.claim_job(conn, job.id, old, None) is None, "a claim is a compare-and-set"
        repo.update_vm(conn, vm, job.id, new, state="Stopping")
    with pytest.raises(repo.StaleWrite), engine.begin() as conn:
        repo.update_vm(conn, vm, job.id, old, state="Stopping")  # its version is stale
    with pytest.raises(repo.StaleWrite), engine.begin() as conn:
        repo.finish_job(conn, job.id, old, result={})  # the job is no longer its own
    with engine.begin() as conn:
        assert repo.get_vm(conn, "a" * 32).version == vm.version + 1
        assert repo.get_job(conn, job.id).state == "Running"
        assert repo.finish_job(conn, job.id, new, result={}).state == "Succeeded"
        assert repo.claim_job(conn, job.id, new, new) is None, "a finished job is never claimed again"
    engine.dispose()
