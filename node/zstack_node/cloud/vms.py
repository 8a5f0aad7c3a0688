"""The VM service: create runs on the MN that took the message; every other action on the VM's owner.

Each action is at most three steps: (1) a fenced transaction moves the VM to its transitional state
and stamps the job on it, (2) the simulated agent does the work, (3) a fenced transaction sets the
final state and finishes the job. A job re-driven after its MN died resumes at step 2 when the VM
carries its stamp in the transitional state; otherwise it starts at step 1. Steps 1 and 3 commit
the job row with the VM row, so no job changes a VM twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Row

from zstack_node.bus.envelope import Envelope
from zstack_node.cloud import allocator, repo
from zstack_node.cloud.jobs import JobDriver, JobFailure
from zstack_node.cloud.simulator import AgentError, Simulator
from zstack_node.ring import Ring, RingChange
from zstack_node.service import Service, ServiceContext, handles

log = logging.getLogger(__name__)

SERVICE = "vm"
MESSAGE = "VmJob"
TRANSITIONAL = frozenset(("Starting", "Stopping", "Migrating"))


@dataclass(frozen=True)
class Action:
    """How one action moves a VM: allowed sources, transitional and final states, and the undo state."""

    sources: tuple[str, ...]
    transit: str | None
    final: str
    undo: str


ACTIONS: dict[str, Action] = {
    "start": Action(("Created", "Stopped"), "Starting", "Running", "Stopped"),
    "stop": Action(("Running",), "Stopping", "Stopped", "Running"),
    "reboot": Action(("Running",), "Starting", "Running", "Running"),
    "migrate": Action(("Running",), "Migrating", "Running", "Running"),
    "destroy": Action(("Created", "Running", "Stopped"), None, "Destroyed", "Destroyed"),
}


def invalid_transition(action: str, state: str) -> str | None:
    """Why `action` cannot run on a VM in `state`, or None if it can."""
    spec = ACTIONS[action]
    if state in spec.sources:
        return None
    return f"cannot {action} a VM that is {state} (allowed from: {', '.join(spec.sources)})"


class VmService(JobDriver, Service):
    """Runs vm.* jobs on this MN."""

    name = SERVICE
    operations = frozenset({"vm.create", *(f"vm.{a}" for a in ACTIONS)})

    def __init__(self, ctx: ServiceContext) -> None:
        Service.__init__(self, ctx)
        JobDriver.__init__(self, ctx)
        self.agent = Simulator(ctx.settings.cloud)

    @handles(MESSAGE)
    async def on_job(self, msg: Envelope) -> None:
        """An accepted job arrived (locally for create, on the owner for the rest): queue it."""
        self.submit(str(msg.body["job"]), str(msg.body["resource"]))

    async def on_node_left(self, change: RingChange) -> None:
        self.count_gained(change, "vm", _live_vm_uuids)

    async def on_self_joined(self, ring: Ring) -> None:
        """Nothing to track for VMs: the sweeper finds their unfinished jobs."""

    async def on_self_dead(self) -> None:
        await self.close()

    # ---- the work ----------------------------------------------------------------------------

    def begin(self, conn: Connection, job: Row, me: str, *, fence: bool = False) -> Row:
        """Step 1 in one transaction: read the VM, check the action, and move the VM to its transitional
        state (create: allocate a host and insert it, Starting); the VM row the agent call needs.

        `fence` touches the job first. A caller whose transaction just claimed the job needs no fence;
        its create places the VM without reading it first (the insert fails if it exists, and the
        transaction rolls back, for `run` to do it the general way)."""
        if job.operation == "vm.create" and not fence:
            return self._place(conn, job, me)
        vm = repo.get_vm(conn, job.resource_uuid)
        if job.operation == "vm.create":
            if vm is None:
                if fence:
                    repo.touch_job(conn, job.id, me)
                return self._place(conn, job, me)
            if not (vm.job_id == job.id and vm.state == "Starting"):
                raise JobFailure("already_exists", f"uuid: VM {job.resource_uuid} already exists")
            return vm
        action = job.operation.removeprefix("vm.")
        spec = ACTIONS[action]
        if vm is None:
            raise JobFailure("not_found", f"VM {job.resource_uuid} does not exist")
        resuming = vm.job_id == job.id and spec.transit is not None and vm.state == spec.transit
        if not resuming:
            reason = invalid_transition(action, vm.state)
            if reason:
                raise JobFailure("invalid_state", reason)
            if spec.transit is not None:
                if fence:
                    repo.touch_job(conn, job.id, me)
                return self._begin(conn, job, me, vm, action, spec)
        return vm

    async def apply(self, job: Row, me: str, prepared: Row | None = None) -> Row:
        vm = prepared if prepared is not None else await self.db(self.begin, job, me, fence=True)
        if job.operation == "vm.create":
            try:
                await self.agent.call(vm.host_uuid, "start", vm.uuid)
            except AgentError as exc:
                return await self.db(self._undo_create, job, me, vm, JobFailure("agent_error", str(exc)))
            return await self.db(self._complete, job, me, vm, "start", ACTIONS["start"])
        action = job.operation.removeprefix("vm.")
        spec = ACTIONS[action]
        try:
            await self.agent.call(vm.host_uuid or "-", action, vm.uuid)
        except AgentError as exc:
            return await self.db(self._undo, job, me, vm, spec, JobFailure("agent_error", str(exc)))
        return await self.db(self._complete, job, me, vm, action, spec)

    def abort(self, conn: Connection, job: Row, me: str, failure: JobFailure) -> Row:
        """Fail the job; a VM it left in a transitional state goes back (and gives back what it reserved)."""
        vm = repo.get_vm(conn, job.resource_uuid)
        if vm is None or vm.job_id != job.id or vm.state not in TRANSITIONAL:
            return repo.finish_job(conn, job.id, me, error=failure.as_dict())
        if job.operation == "vm.create":
            return self._undo_create(conn, job, me, vm, failure)
        return self._undo(conn, job, me, vm, ACTIONS[job.operation.removeprefix("vm.")], failure)

    def _begin(self, conn: Connection, job: Row, me: str, vm: Row, action: str, spec: Action) -> Row:
        values: dict[str, Any] = {"state": spec.transit}
        if action == "migrate":
            pinned = job.parameters.get("host_uuid")
            if pinned == vm.host_uuid:
                raise JobFailure("invalid_state", f"host_uuid: VM {vm.uuid} already runs on host {pinned}")
            values["migrate_to"] = allocator.allocate(conn, vm.cpu, vm.memory, pinned=pinned, exclude=vm.host_uuid)
        return repo.update_vm(conn, vm, job.id, me, **values)

    def _undo(self, conn: Connection, job: Row, me: str, vm: Row, spec: Action, failure: JobFailure) -> Row:
        if spec.transit is not None:
            if vm.migrate_to:
                allocator.release(conn, vm.migrate_to, vm.cpu, vm.memory)
            repo.update_vm(conn, vm, job.id, me, state=spec.undo, migrate_to=None)
        return repo.finish_job(conn, job.id, me, error=failure.as_dict())

    def _complete(self, conn: Connection, job: Row, me: str, vm: Row, action: str, spec: Action) -> Row:
        values: dict[str, Any] = {"state": spec.final}
        if action == "migrate":
            allocator.release(conn, vm.host_uuid, vm.cpu, vm.memory)
            values.update(host_uuid=vm.migrate_to, migrate_to=None)
        elif action == "destroy":
            allocator.release(conn, vm.host_uuid, vm.cpu, vm.memory)
            values.update(host_uuid=None)
        return repo.update_vm_and_finish_job(conn, vm, job.id, me, **values)

    def _place(self, conn: Connection, job: Row, me: str) -> Row:
        """Allocate a host and insert the VM, Starting (in the transaction of the job's fence)."""
        params = job.parameters
        host = allocator.allocate(conn, params["cpu"], params["memory"], pinned=params.get("host_uuid"))
        row = repo.insert_vm(conn, job.resource_uuid, params["name"], params["cpu"], params["memory"], host, job.id,
                             me)
        if row is None:
            raise repo.StaleWrite(f"VM {job.resource_uuid} was inserted by someone else")
        return row

    def _undo_create(self, conn: Connection, job: Row, me: str, vm: Row, failure: JobFailure) -> Row:
        allocator.release(conn, vm.host_uuid, vm.cpu, vm.memory)
        repo.update_vm(conn, vm, job.id, me, state="Destroyed", host_uuid=None)
        return repo.finish_job(conn, job.id, me, error=failure.as_dict())


def _live_vm_uuids(conn: Connection) -> list[str]:
    return [r.uuid for r in conn.execute(text("SELECT uuid FROM vm_instances WHERE state <> 'Destroyed'"))]
