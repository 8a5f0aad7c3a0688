"""SQL access of the cloud: rows as API dicts, jobs, and version-fenced writes.

Every function takes a SQLAlchemy Connection (the caller owns the transaction) and is called
from a worker thread. A fenced write that matches no row raises `StaleWrite`: somebody else
changed the row (or took the job) first, and this attempt must not go on.
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

HOST_COLUMNS = ("uuid", "name", "cpu_capacity", "cpu_used", "memory_capacity", "memory_used", "state", "version",
                "created_at")
VM_COLUMNS = ("uuid", "name", "cpu", "memory", "host_uuid", "state", "version", "created_at")
JOB_COLUMNS = ("id", "operation", "resource_uuid", "parameters", "state", "result", "error", "mn", "created_at",
               "updated_at", "finished_at")
TERMINAL = ("Succeeded", "Failed")
# The database cannot be reached, dropped the connection, or every pooled connection is busy: worth
# a retry, or a 503. Any other SQLAlchemyError (bad data, a broken constraint) is a bug, and retrying
# would only repeat it.
DB_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)


class StaleWrite(Exception):
    """A fenced write matched no row: the version moved on, or the job is no longer ours."""


def new_uuid() -> str:
    return uuidlib.uuid4().hex


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _public(row: Row | dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    data = row._mapping if isinstance(row, Row) else row
    return {c: iso(data[c]) if isinstance(data[c], datetime) else data[c] for c in columns}


def host_dict(row: Row | dict[str, Any]) -> dict[str, Any]:
    return _public(row, HOST_COLUMNS)


def vm_dict(row: Row | dict[str, Any]) -> dict[str, Any]:
    return _public(row, VM_COLUMNS)


def job_dict(row: Row | dict[str, Any]) -> dict[str, Any]:
    return _public(row, JOB_COLUMNS)


# ---- reads -------------------------------------------------------------------------------------


def get_host(conn: Connection, host_uuid: str) -> Row | None:
    return conn.execute(text("SELECT * FROM hosts WHERE uuid = :u"), {"u": host_uuid}).first()


def list_hosts(conn: Connection, after: list[str] | None, limit: int) -> list[Row]:
    """Up to `limit` hosts by UUID, after the UUID `after[0]` (keyset paging)."""
    return list(conn.execute(text(
        "SELECT * FROM hosts WHERE (CAST(:a AS varchar) IS NULL OR uuid > :a) ORDER BY uuid LIMIT :n"),
        {"a": after[0] if after else None, "n": limit}))


def get_vm(conn: Connection, vm_uuid: str) -> Row | None:
    return conn.execute(text("SELECT * FROM vm_instances WHERE uuid = :u"), {"u": vm_uuid}).first()


def list_vms(conn: Connection, state: str | None, host_uuid: str | None, after: list[str] | None,
             limit: int) -> list[Row]:
    """Up to `limit` VMs by UUID after `after[0]`, optionally of one state or on one host."""
    return list(conn.execute(text(
        "SELECT * FROM vm_instances WHERE (CAST(:s AS varchar) IS NULL OR state = :s)"
        " AND (CAST(:h AS varchar) IS NULL OR host_uuid = :h) AND (CAST(:a AS varchar) IS NULL OR uuid > :a)"
        " ORDER BY uuid LIMIT :n"),
        {"s": state, "h": host_uuid, "a": after[0] if after else None, "n": limit}))


def has_open_jobs(conn: Connection, resource_uuid: str) -> bool:
    return bool(conn.execute(text(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE resource_uuid = :r AND state IN ('Pending', 'Running'))"),
        {"r": resource_uuid}).scalar())


def get_job(conn: Connection, job_id: str) -> Row | None:
    return conn.execute(text("SELECT * FROM jobs WHERE id = :j"), {"j": job_id}).first()


def list_jobs(conn: Connection, resource_uuid: str | None, state: str | None, before: list[str] | None,
              limit: int) -> list[Row]:
    """Up to `limit` jobs, newest first, created before `before` = [created_at (ISO), id]."""
    return list(conn.execute(text(
        "SELECT * FROM jobs WHERE (CAST(:r AS varchar) IS NULL OR resource_uuid = :r)"
        " AND (CAST(:s AS varchar) IS NULL OR state = :s)"
        " AND (CAST(:c AS timestamptz) IS NULL OR (created_at, id) < (CAST(:c AS timestamptz), :i))"
        " ORDER BY created_at DESC, id DESC LIMIT :n"),
        {"r": resource_uuid, "s": state, "c": before[0] if before else None, "i": before[1] if before else None,
         "n": limit}))


def job_key(job: Row) -> tuple[str, str]:
    """A job's paging key: its creation time to the microsecond, and its id."""
    return job.created_at.isoformat(), job.id


def open_jobs_up_to(conn: Connection, job_id: str) -> list[Row]:
    """The unfinished jobs on the resource of `job_id` accepted before it, oldest first, then the job itself.

    Messages reach the owner by different MNs, so they may arrive out of order; the owner runs
    them in the order they were accepted.
    """
    return list(conn.execute(text(
        "SELECT o.* FROM jobs j JOIN jobs o ON o.resource_uuid = j.resource_uuid"
        " WHERE j.id = :j AND (o.id = :j OR (o.state IN ('Pending', 'Running')"
        " AND (o.created_at, o.id) < (j.created_at, j.id))) ORDER BY o.created_at, o.id"), {"j": job_id}))


def abandoned_jobs(conn: Connection, me: str, live: list[str], dead_grace: float, pending_grace: float,
                   after: tuple[datetime, str] | None = None, limit: int = 1000) -> list[Row]:
    """Unfinished jobs that nobody may be driving, oldest first, one page of `limit` after `after`.

    Candidates are filtered here, not by the caller, so live MNs' jobs never fill a page: a job
    whose MN is not in `live` after `dead_grace` seconds without progress; a job without an MN (its
    message may be lost), or claimed by `me` (a run that gave up), after `pending_grace`.
    """
    return list(conn.execute(text(
        "SELECT * FROM jobs WHERE state IN ('Pending', 'Running')"
        " AND (CAST(:c AS timestamptz) IS NULL OR (created_at, id) > (CAST(:c AS timestamptz), :i))"
        " AND CASE WHEN mn IS NULL OR mn = :me THEN updated_at < clock_timestamp() - make_interval(secs => :p)"
        " ELSE mn <> ALL(:live) AND updated_at < clock_timestamp() - make_interval(secs => :d) END"
        " ORDER BY created_at, id LIMIT :n"),
        {"me": me, "live": list(live), "d": dead_grace, "p": pending_grace, "c": after[0] if after else None,
         "i": after[1] if after else None, "n": limit}))


# ---- job writes --------------------------------------------------------------------------------
#
# The writes of a job's steps run through the DBAPI cursor of the caller's connection (in its
# transaction): SQLAlchemy's text() parsing, cache keys and result metadata cost 2 to 4 times the
# statement's own client CPU, on the hottest path of every job. Errors are wrapped as SQLAlchemy's
# would be (DB_UNAVAILABLE still means the database is away, and a lost connection is invalidated).


class Record(dict[str, Any]):
    """A row read through the cursor: a dict whose columns are attributes too, like a Row's."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> Record:
        return self


class _Statement:
    """One statement of this section, prepared on the server once per connection.

    psycopg2 sends plain SQL, which the server parses, analyses and plans on every execution: for
    the claim (a NOT EXISTS subquery) that was 40 % of its server CPU. `PREPARE` once per session
    (`EXECUTE` afterwards, with the values quoted by psycopg2) skips that. The prepared names are
    kept in the pool's record of the connection, which is cleared when the connection is replaced;
    a PREPARE survives a rolled-back transaction."""

    _count = 0

    def __init__(self, statement: str) -> None:
        names = list(dict.fromkeys(re.findall(r"(?<![:\w]):(\w+)", statement)))
        positions = {name: i for i, name in enumerate(names, start=1)}
        _Statement._count += 1
        self.name = f"zstack_{_Statement._count}"
        self.prepare = f"PREPARE {self.name} AS " + re.sub(
            r"(?<![:\w]):(\w+)", lambda m: f"${positions[m.group(1)]}", statement)
        self.execute = f"EXECUTE {self.name}" + (f"({', '.join(f'%({n})s' for n in names)})" if names else "")


def _sql(statement: str) -> _Statement:
    """`:name` placeholders (the statements here hold no other colons, and no %)."""
    return _Statement(statement)


def _execute(conn: Connection, statement: _Statement, params: dict[str, Any]) -> Any:
    if not conn.in_transaction():
        conn.begin()  # as conn.execute would (autobegin): the caller's commit() must commit this
    pooled = conn.connection
    prepared: set[str] = pooled.info.setdefault("zstack_prepared", set())
    cursor = pooled.cursor()
    sql = statement.prepare
    try:
        if statement.name not in prepared:
            cursor.execute(sql)
            prepared.add(statement.name)
        sql = statement.execute
        cursor.execute(sql, params)
    except Exception as exc:
        cursor.close()
        conn._handle_dbapi_exception(exc, sql, params, cursor, None)  # raises it, wrapped
    return cursor


def _first(conn: Connection, statement: _Statement, params: dict[str, Any]) -> Record | None:
    cursor = _execute(conn, statement, params)
    try:
        row = cursor.fetchone()
        return None if row is None else Record(zip([c[0] for c in cursor.description], row, strict=True))
    finally:
        cursor.close()


def _rowcount(conn: Connection, statement: _Statement, params: dict[str, Any]) -> int:
    cursor = _execute(conn, statement, params)
    count = cursor.rowcount
    cursor.close()
    return count


_INSERT_JOB = _sql("INSERT INTO jobs (id, operation, resource_uuid, parameters) VALUES (:j, :o, :r, CAST(:p AS jsonb))"
                   " RETURNING *")
_FAIL_UNCLAIMED = _sql(
    "UPDATE jobs SET state = 'Failed', error = CAST(:e AS jsonb), updated_at = clock_timestamp(),"
    " finished_at = clock_timestamp() WHERE id = :j AND state = 'Pending'")
_CLAIM_JOB = _sql(
    "UPDATE jobs SET state = 'Running', mn = :me, updated_at = clock_timestamp()"
    " WHERE id = :j AND state IN ('Pending', 'Running') AND mn IS NOT DISTINCT FROM :prev RETURNING *")
_CLAIM_IF_FIRST = _sql(
    "UPDATE jobs j SET state = 'Running', mn = :me, updated_at = clock_timestamp()"
    " WHERE j.id = :j AND j.state = 'Pending' AND j.mn IS NULL AND j.operation = ANY(:ops)"
    " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.resource_uuid = j.resource_uuid"
    " AND o.state IN ('Pending', 'Running') AND (o.created_at, o.id) < (j.created_at, j.id)) RETURNING *")
_RELEASE_JOB = _sql("UPDATE jobs SET mn = NULL, updated_at = clock_timestamp()"
                    " WHERE id = :j AND mn = :me AND state = 'Running'")
_TOUCH_JOB = _sql("UPDATE jobs SET updated_at = clock_timestamp() WHERE id = :j AND mn = :me AND state = 'Running'")
_FINISH_JOB = _sql(
    "UPDATE jobs SET state = :s, result = CAST(:r AS jsonb), error = CAST(:e AS jsonb),"
    " updated_at = clock_timestamp(), finished_at = clock_timestamp()"
    " WHERE id = :j AND mn = :me AND state = 'Running' RETURNING *")


def insert_job(conn: Connection, operation: str, resource_uuid: str, parameters: dict[str, Any]) -> Record:
    row = _first(conn, _INSERT_JOB, {"j": new_uuid(), "o": operation, "r": resource_uuid, "p": json.dumps(parameters)})
    assert row is not None
    return row


def fail_unclaimed(conn: Connection, job_id: str, error: dict[str, Any]) -> bool:
    """Fail a job nobody has started (its message could not be published); False if it was taken."""
    return _rowcount(conn, _FAIL_UNCLAIMED, {"j": job_id, "e": json.dumps(error)}) == 1


def claim_job(conn: Connection, job_id: str, me: str, previous: str | None) -> Record | None:
    """Make `me` the MN running the job if its MN is still `previous` (compare-and-set)."""
    return _first(conn, _CLAIM_JOB, {"j": job_id, "me": me, "prev": previous})


def claim_if_first(conn: Connection, job_id: str, me: str, operations: list[str]) -> Record | None:
    """Claim a Pending job nobody claimed if it is one of `operations` and no older job on its resource
    is open (`open_jobs_up_to` would return it alone): the common case, in one statement."""
    return _first(conn, _CLAIM_IF_FIRST, {"j": job_id, "me": me, "ops": operations})


def release_job(conn: Connection, job_id: str, me: str) -> None:
    """Give a job back (mn NULL) so that the sweeper drives it later."""
    _rowcount(conn, _RELEASE_JOB, {"j": job_id, "me": me})


def touch_job(conn: Connection, job_id: str, me: str) -> None:
    """Fence: the job is still ours and still running; raise StaleWrite otherwise."""
    if _rowcount(conn, _TOUCH_JOB, {"j": job_id, "me": me}) != 1:
        raise StaleWrite(f"job {job_id} is no longer run by {me}")


def finish_job(conn: Connection, job_id: str, me: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> Record:
    """Succeed (result) or fail (error) a job this MN runs; raise StaleWrite if it is not ours."""
    row = _first(conn, _FINISH_JOB, {
        "j": job_id, "me": me, "s": "Failed" if error else "Succeeded",
        "r": None if result is None else json.dumps(result), "e": None if error is None else json.dumps(error)})
    if row is None:
        raise StaleWrite(f"job {job_id} is no longer run by {me}")
    return row


# ---- resource writes ---------------------------------------------------------------------------

_UPDATE_VM: dict[tuple[str, ...], _Statement] = {}  # statement by the columns set
_RECORD_VM_CHANGE = _sql(
    "INSERT INTO vm_history (vm_uuid, job_id, from_state, to_state, version, mn) VALUES (:u, :j, :f, :t, :v, :m)")
_INSERT_VM = _sql(
    "WITH v AS (INSERT INTO vm_instances (uuid, name, cpu, memory, host_uuid, state, job_id)"
    " VALUES (:u, :n, :c, :m, :h, 'Starting', :j) ON CONFLICT (uuid) DO NOTHING RETURNING *),"
    " h AS (INSERT INTO vm_history (vm_uuid, job_id, from_state, to_state, version, mn)"
    " SELECT uuid, CAST(:j AS varchar), NULL, state, version, CAST(:me AS varchar) FROM v)"
    " SELECT * FROM v")
_TAKE_CAPACITY = _sql(
    "UPDATE hosts SET cpu_used = cpu_used + :c, memory_used = memory_used + :m"
    " WHERE uuid = :h AND state = 'Connected' AND cpu_used + :c <= cpu_capacity"
    " AND memory_used + :m <= memory_capacity")
# The host is chosen by an uncorrelated scalar subquery: PostgreSQL runs it once (an InitPlan). As a
# joined subquery (UPDATE ... FROM) it may be run again per row scanned, and with SKIP LOCKED each run
# may pick another host: one statement then reserved capacity on two.
_TAKE_FREE_HOST = _sql(
    "UPDATE hosts SET cpu_used = cpu_used + :c, memory_used = memory_used + :m"
    " WHERE uuid = (SELECT uuid FROM hosts WHERE state = 'Connected' AND cpu_capacity - cpu_used >= :c"
    " AND memory_capacity - memory_used >= :m AND uuid IS DISTINCT FROM :x"
    " ORDER BY cpu_capacity - cpu_used DESC, uuid LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " AND state = 'Connected' AND cpu_used + :c <= cpu_capacity AND memory_used + :m <= memory_capacity"
    " RETURNING uuid")
_GIVE_CAPACITY = _sql("UPDATE hosts SET cpu_used = cpu_used - :c, memory_used = memory_used - :m WHERE uuid = :h")
_CAPACITY_CANDIDATES = _sql(
    "SELECT uuid FROM hosts WHERE state = 'Connected' AND cpu_capacity - cpu_used >= :c"
    " AND memory_capacity - memory_used >= :m AND uuid IS DISTINCT FROM :x"
    " ORDER BY cpu_capacity - cpu_used DESC, uuid LIMIT :n")


def _vm_change(names: tuple[str, ...]) -> str:
    """`WITH v AS (the fenced VM update), h AS (its history row, only when the state changed)` for the columns
    `names`: the head of the statements that change a VM."""
    sets = ", ".join(f"{name} = :{name}" for name in names)
    return (f"WITH v AS (UPDATE vm_instances SET {sets}, job_id = :job, version = version + 1"
            " WHERE uuid = :u AND version = :v RETURNING *),"
            " h AS (INSERT INTO vm_history (vm_uuid, job_id, from_state, to_state, version, mn)"
            " SELECT uuid, CAST(:job AS varchar), CAST(:prior AS varchar), state, version, CAST(:me AS varchar)"
            " FROM v WHERE state IS DISTINCT FROM CAST(:prior AS varchar))")


def update_vm(conn: Connection, vm: Row | Record, job_id: str, me: str, **values: Any) -> Record:
    """Change a VM fenced by its version, stamp the job on it, and record the change in its history
    (one statement: the history row is written only when the state changed)."""
    names = tuple(values)
    statement = _UPDATE_VM.get(names)
    if statement is None:
        statement = _UPDATE_VM[names] = _sql(f"{_vm_change(names)} SELECT * FROM v")
    row = _first(conn, statement, {**values, "job": job_id, "u": vm.uuid, "v": vm.version, "prior": vm.state,
                                   "me": me})
    if row is None:
        raise StaleWrite(f"VM {vm.uuid} changed after version {vm.version}")
    return row


_FINISH_WITH_VM: dict[tuple[str, ...], _Statement] = {}  # statement by the VM columns set


def update_vm_and_finish_job(conn: Connection, vm: Row | Record, job_id: str, me: str, **values: Any) -> Record:
    """`update_vm`, then `finish_job` with the new VM as the result, in one statement: the job ends
    only if the VM was still at its version and the job is still this MN's; StaleWrite otherwise.

    The result is the VM as the UPDATE leaves it (the row we had, the values, the job's stamp and the
    next version); the statement checks that version."""
    names = tuple(values)
    statement = _FINISH_WITH_VM.get(names)
    if statement is None:
        statement = _FINISH_WITH_VM[names] = _sql(
            f"{_vm_change(names)}, j AS (UPDATE jobs SET state = 'Succeeded', result = CAST(:r AS jsonb), error = NULL,"
            " updated_at = clock_timestamp(), finished_at = clock_timestamp()"
            " WHERE id = :job AND mn = :me AND state = 'Running'"
            " AND EXISTS (SELECT 1 FROM v WHERE version = CAST(:v AS bigint) + 1) RETURNING *)"
            " SELECT * FROM j")
    after = {**(vm._mapping if isinstance(vm, Row) else vm), **values, "job_id": job_id, "version": vm.version + 1}
    row = _first(conn, statement, {**values, "job": job_id, "u": vm.uuid, "v": vm.version, "prior": vm.state,
                                   "me": me, "r": json.dumps(vm_dict(after))})
    if row is None:
        raise StaleWrite(f"VM {vm.uuid} changed after version {vm.version}, or job {job_id} is no longer run by {me}")
    return row


def insert_vm(conn: Connection, vm_uuid: str, name: str, cpu: int, memory: int, host_uuid: str, job_id: str,
              me: str) -> Record | None:
    """Insert a VM, Starting, stamped with its create job, and its first history row; None if the UUID
    is taken."""
    return _first(conn, _INSERT_VM, {"u": vm_uuid, "n": name, "c": cpu, "m": memory, "h": host_uuid, "j": job_id,
                                     "me": me})


def record_vm_change(conn: Connection, vm: Row | Record, job_id: str, me: str, from_state: str | None) -> None:
    _rowcount(conn, _RECORD_VM_CHANGE,
              {"u": vm.uuid, "j": job_id, "f": from_state, "t": vm.state, "v": vm.version, "m": me})


def take_free_host(conn: Connection, cpu: int, memory: int, exclude: str | None) -> str | None:
    """Reserve capacity on the Connected host with the most free CPU where the VM fits and that no
    concurrent transaction holds (SKIP LOCKED: concurrent creates spread instead of queueing on one
    host); None if there is none."""
    cursor = _execute(conn, _TAKE_FREE_HOST, {"c": cpu, "m": memory, "x": exclude})
    try:
        rows = cursor.fetchall()
    finally:
        cursor.close()
    if len(rows) > 1:  # never, by the statement's form; a reservation on two hosts must not commit
        raise RuntimeError(f"one allocation reserved capacity on {len(rows)} hosts")
    return rows[0][0] if rows else None


def take_capacity(conn: Connection, host_uuid: str, cpu: int, memory: int) -> bool:
    """Atomically reserve capacity on a Connected host; False if it does not fit (or is gone)."""
    return _rowcount(conn, _TAKE_CAPACITY, {"h": host_uuid, "c": cpu, "m": memory}) == 1


def give_capacity(conn: Connection, host_uuid: str, cpu: int, memory: int) -> None:
    """Release what `take_capacity` reserved (the symmetric update)."""
    _rowcount(conn, _GIVE_CAPACITY, {"h": host_uuid, "c": cpu, "m": memory})


def capacity_candidates(conn: Connection, cpu: int, memory: int, exclude: str | None, limit: int = 8) -> list[str]:
    """Connected hosts where the VM fits now, the most free CPU first."""
    cursor = _execute(conn, _CAPACITY_CANDIDATES, {"c": cpu, "m": memory, "x": exclude, "n": limit})
    try:
        return [r[0] for r in cursor.fetchall()]
    finally:
        cursor.close()
