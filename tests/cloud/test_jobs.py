"""The job runner in one process on the real database: job order per resource, undo after an internal
error, and the sweeper's candidate query. The MN around it is a plain stand-in (uuid, state, ring)."""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from zstack_node.cloud import jobs, repo
from zstack_node.cloud.settings import CloudSettings
from zstack_node.cloud.sweeper import Sweeper
from zstack_node.cloud.vms import VmService
from zstack_node.db import migrate
from zstack_node.ring import Ring
from zstack_node.schema import MIGRATIONS


class Bus:
    def publish_event(self, _topic: str, _body: dict[str, Any]) -> None:
        pass


class Context:
    """What the job runner reads of its ServiceContext."""

    def __init__(self, engine: Engine, me: str, members: set[str]) -> None:
        self.engine = engine
        self.settings = SimpleNamespace(cloud=CloudSettings())
        self.uuid = me
        self.state = "running"
        self.ring = Ring.of(members)
        self.bus = Bus()
        self.services: dict[str, Any] = {}
        self.acting = True  # False: the MN is suspended (or its heartbeat is overdue)

    def may_act(self) -> bool:
        return self.acting


class Agent:
    """A simulated agent that records its calls, and raises `error` (not an AgentError) when set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.error: Exception | None = None

    async def call(self, _host: str, operation: str, _vm: str | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.calls.append(operation)


@pytest.fixture
def engine(fresh_database) -> Engine:
    made = create_engine(fresh_database)
    migrate(made, MIGRATIONS)
    yield made
    made.dispose()


def sql(engine: Engine, query: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.execute(text(query), params)
        return list(result) if result.returns_rows else []


def add_host(engine: Engine, cpu: int = 8) -> str:
    host = uuid.uuid4().hex
    sql(engine, "INSERT INTO hosts (uuid, name, cpu_capacity, memory_capacity, state)"
                " VALUES (:u, 'h', :c, 8192, 'Connected')", u=host, c=cpu)
    return host


def add_vm(engine: Engine, host: str, state: str = "Running", cpu: int = 2) -> str:
    vm = uuid.uuid4().hex
    sql(engine, "INSERT INTO vm_instances (uuid, name, cpu, memory, host_uuid, state)"
                " VALUES (:u, 'v', :c, 256, :h, :s)", u=vm, c=cpu, h=host, s=state)
    sql(engine, "UPDATE hosts SET cpu_used = cpu_used + :c, memory_used = memory_used + 256 WHERE uuid = :h",
        c=cpu, h=host)
    return vm


def add_job(engine: Engine, operation: str, resource: str, *, mn: str | None = None,
            parameters: dict[str, Any] | None = None) -> str:
    job = uuid.uuid4().hex
    sql(engine, "INSERT INTO jobs (id, operation, resource_uuid, parameters, state, mn)"
                " VALUES (:j, :o, :r, CAST(:p AS jsonb), :s, :m)",
        j=job, o=operation, r=resource, p=json.dumps(parameters or {}), s="Running" if mn else "Pending", m=mn)
    return job


def job_row(engine: Engine, job: str) -> Any:
    return sql(engine, "SELECT * FROM jobs WHERE id = :j", j=job)[0]


def vm_row(engine: Engine, vm: str) -> Any:
    return sql(engine, "SELECT * FROM vm_instances WHERE uuid = :u", u=vm)[0]


def cpu_used(engine: Engine, host: str) -> int:
    return sql(engine, "SELECT cpu_used FROM hosts WHERE uuid = :h", h=host)[0].cpu_used


def vm_service(engine: Engine, me: str, members: set[str]) -> tuple[VmService, Agent]:
    service = VmService(Context(engine, me, members))
    service.agent = agent = Agent()
    service.ctx.services["vm"] = service
    return service, agent


def test_a_suspended_mn_calls_no_agent_and_its_sweeper_finishes_the_job_once_it_resumes(engine):
    me = uuid.uuid4().hex
    vm = add_vm(engine, add_host(engine), state="Running")
    stop = add_job(engine, "vm.stop", vm)
    service, agent = vm_service(engine, me, {me})

    async def scenario() -> None:
        service.ctx.acting = False
        await service.submit(stop, vm)
        assert agent.calls == [] and job_row(engine, stop).state == "Pending", "acted while suspended"
        sweeper = Sweeper(service.ctx)
        sweeper.dead_grace = sweeper.pending_grace = 0.001
        service.ctx.acting = True  # resumed
        assert await sweeper.sweep() == 1
        await service.queues.drain(30)
        await service.close()

    asyncio.run(scenario())
    assert agent.calls == ["stop"] and job_row(engine, stop).state == "Succeeded"


def test_a_chain_stops_at_an_unfinished_job_and_the_sweeper_keeps_the_order(engine, monkeypatch):
    """stop (still run by another live MN) then start: the start must not overtake the stop."""
    monkeypatch.setattr(jobs, "_WAIT_FOR_OTHER", 0.3)
    me, other = uuid.uuid4().hex, uuid.uuid4().hex
    vm = add_vm(engine, add_host(engine))
    stop = add_job(engine, "vm.stop", vm, mn=other)
    start = add_job(engine, "vm.start", vm)
    service, agent = vm_service(engine, me, {me, other})

    async def scenario() -> None:
        await service.submit(start, vm)  # runs the older stop first: it waits for the other MN, then gives up
        assert job_row(engine, start).state == "Pending", "the start ran before the older stop ended"
        assert agent.calls == []

        service.ctx.ring = Ring.of({me})  # the other MN left: the sweeper drives both, oldest first
        sweeper = Sweeper(service.ctx)
        sweeper.dead_grace = sweeper.pending_grace = 0.001
        sweeper.page = 1  # a page of one: the second job is on the next page
        assert await sweeper.sweep() == 2
        await service.queues.drain(30)
        await service.close()

    asyncio.run(scenario())
    assert agent.calls == ["stop", "start"]
    assert (job_row(engine, stop).state, job_row(engine, start).state) == ("Succeeded", "Succeeded")
    history = sql(engine, "SELECT to_state FROM vm_history WHERE vm_uuid = :u ORDER BY version", u=vm)
    assert [r.to_state for r in history] == ["Stopping", "Stopped", "Starting", "Running"]


@pytest.mark.parametrize("operation, before, after", [
    ("vm.migrate", "Running", "Running"),
    ("vm.start", "Stopped", "Stopped"),
    ("vm.stop", "Running", "Running"),
    ("vm.create", None, "Destroyed"),
])
def test_an_internal_error_undoes_the_action_with_the_failure(engine, operation, before, after):
    """An unexpected exception mid-action: the job fails and the VM is back where it was, capacity too."""
    me = uuid.uuid4().hex
    source, target = add_host(engine), add_host(engine)
    if operation == "vm.create":
        vm = uuid.uuid4().hex
        job = add_job(engine, operation, vm, parameters={"name": "v", "cpu": 2, "memory": 256, "host_uuid": target})
    else:
        vm = add_vm(engine, source, before)
        job = add_job(engine, operation, vm, parameters={"host_uuid": target} if operation == "vm.migrate" else {})
    service, agent = vm_service(engine, me, {me})
    agent.error = RuntimeError("agent bug")

    async def scenario() -> None:
        await service.submit(job, vm)
        await service.close()

    asyncio.run(scenario())
    finished = job_row(engine, job)
    assert finished.state == "Failed" and finished.error["code"] == "internal_error", finished
    assert "agent bug" in finished.error["message"]
    row = vm_row(engine, vm)
    assert (row.state, row.migrate_to) == (after, None)
    assert cpu_used(engine, target) == 0, "the failed job kept capacity on the target host"
    assert cpu_used(engine, source) == (0 if operation == "vm.create" else 2)


def test_abandoned_jobs_are_never_hidden_behind_live_ones(engine):
    """More jobs held by live MNs than a page: the abandoned ones are still found, and only they."""
    me, live, dead = (uuid.uuid4().hex for _ in range(3))
    for _ in range(25):
        add_job(engine, "vm.stop", uuid.uuid4().hex, mn=live)
    mine_idle = add_job(engine, "vm.stop", uuid.uuid4().hex, mn=me)
    lost = add_job(engine, "vm.start", uuid.uuid4().hex)
    left = add_job(engine, "vm.stop", uuid.uuid4().hex, mn=dead)
    sql(engine, "UPDATE jobs SET updated_at = updated_at - interval '1 hour'")
    add_job(engine, "vm.stop", uuid.uuid4().hex)  # Pending, but its message may still be on its way
    with engine.begin() as conn:
        found = repo.abandoned_jobs(conn, me, [me, live], dead_grace=0.5, pending_grace=10, limit=10)
        assert [r.id for r in found] == [mine_idle, lost, left]
        page = repo.abandoned_jobs(conn, me, [me, live], 0.5, 10, after=(found[0].created_at, found[0].id), limit=1)
        assert [r.id for r in page] == [lost]


def test_a_job_i_claimed_but_another_mn_owns_is_given_back_to_its_owner(engine):
    """My claim on a job I no longer run would hide it from the owner's sweeper while I live: I release it."""
    me, owner = uuid.uuid4().hex, uuid.uuid4().hex
    ring = Ring.of({me, owner})
    vm = next(u for u in iter(lambda: uuid.uuid4().hex, None) if ring.owner(u) == owner)
    stuck = add_job(engine, "vm.stop", vm, mn=me)
    sql(engine, "UPDATE jobs SET updated_at = updated_at - interval '1 hour'")
    service, agent = vm_service(engine, me, {me, owner})

    async def scenario() -> int:
        sweeper = Sweeper(service.ctx)
        taken = await sweeper.sweep()
        await service.close()
        return taken

    assert asyncio.run(scenario()) == 0, "I must not drive a job whose resource another MN owns"
    assert agent.calls == []
    assert (job_row(engine, stuck).mn, job_row(engine, stuck).state) == (None, "Running")
    sql(engine, "UPDATE jobs SET updated_at = updated_at - interval '1 hour'")
    with engine.begin() as conn:
        found = repo.abandoned_jobs(conn, owner, [me, owner], dead_grace=0.5, pending_grace=10)
    assert [r.id for r in found] == [stuck], "the owner's sweeper must now find it"
