"""Membership in PostgreSQL: the MN table, heartbeats by the database's clock, and eviction.

Every method is synchronous (SQLAlchemy + psycopg2); the node runs them in a worker thread.
All time comparisons use the database's now(), so MNs with skewed clocks still agree.

Each row also keeps `continuous_since`: the start of its current run of heartbeats with no gap longer
than `max_gap`, by the DB clock. It is what lets an MN tell "the others went silent" from "we all lost
the database or the broker" (rule 1b in rule.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import (
    Column,
    ColumnElement,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

mn = Table(
    "management_nodes",
    MetaData(),
    Column("uuid", String(32), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("address", String(255)),
    Column("state", String(16), nullable=False),
    Column("join_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("heartbeat", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("continuous_since", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

RUNNING = "RUNNING"
JOINING = "JOINING"
LEAVING = "LEAVING"


def v1_membership(conn: Connection) -> None:
    """Schema step 1: the MN table (a new database gets today's columns at once; step 3 is then a no-op)."""
    mn.create(conn, checkfirst=True)


def v3_heartbeat_continuity(conn: Connection) -> None:
    """Schema step 3: when each MN's current unbroken run of heartbeats began."""
    conn.execute(text("ALTER TABLE management_nodes ADD COLUMN IF NOT EXISTS continuous_since timestamptz"
                      " NOT NULL DEFAULT now()"))


@dataclass(frozen=True)
class MemberRow:
    uuid: str
    hostname: str
    address: str | None
    state: str
    age: float  # seconds since the last heartbeat, by the DB clock
    continuous_for: float = 0.0  # seconds since its current run of heartbeats began, by the DB clock


class Membership:
    """Reads and writes the `management_nodes` table."""

    def __init__(self, engine: Engine, timeout: float, max_gap: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.max_gap = max_gap

    def _cutoff(self) -> ColumnElement:
        """The oldest heartbeat that still counts as alive, by the DB clock."""
        return func.now() - timedelta(seconds=self.timeout)

    def register(self, uuid: str, hostname: str, address: str | None) -> None:
        """Insert this MN's row as JOINING; `mark(uuid, RUNNING)` makes it count."""
        with self.engine.begin() as conn:
            conn.execute(insert(mn).values(uuid=uuid, hostname=hostname, address=address, state=JOINING))

    def mark(self, uuid: str, state: str) -> bool:
        """Set this MN's state and heartbeat; False when its row is gone or already stale."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(mn).where(mn.c.uuid == uuid, mn.c.heartbeat >= self._cutoff())
                .values(state=state, heartbeat=func.now())
            )
            return result.rowcount == 1

    def heartbeat(self, uuid: str) -> bool:
        """Refresh this MN's heartbeat; False when its row is gone: it was evicted, and must rejoin anew.

        A stale row is revived: it went stale in an outage that nobody could blame on this MN, or it
        would have been evicted (rule 1b); the DELETE and this UPDATE exclude each other in the DB.
        A gap longer than `max_gap` restarts the run of continuous heartbeats.
        """
        gap = timedelta(seconds=self.max_gap)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(mn).where(mn.c.uuid == uuid, mn.c.state.in_((RUNNING, LEAVING))).values(
                    heartbeat=func.now(),
                    continuous_since=case((mn.c.heartbeat >= func.now() - gap, mn.c.continuous_since),
                                          else_=func.now()))
            )
            return result.rowcount == 1

    def exists(self, uuid: str) -> bool:
        """Whether this MN's row is still there (a read: nothing is refreshed)."""
        with self.engine.connect() as conn:
            return conn.execute(select(mn.c.uuid).where(mn.c.uuid == uuid)).first() is not None

    def members(self) -> list[MemberRow]:
        """Every row, with its heartbeat age by the DB clock."""
        age = func.extract("epoch", func.now() - mn.c.heartbeat).label("age")
        run = func.extract("epoch", func.now() - mn.c.continuous_since).label("run")
        with self.engine.connect() as conn:
            rows = conn.execute(select(mn.c.uuid, mn.c.hostname, mn.c.address, mn.c.state, age, run))
            return [MemberRow(r.uuid, r.hostname, r.address, r.state, float(r.age), float(r.run)) for r in rows]

    def evict(self, uuid: str) -> bool:
        """Delete a stale MN's row. Only a still-stale row goes: a duplicate eviction is a no-op, and an MN
        that revived its row first (its heartbeat won the race) stays."""
        with self.engine.begin() as conn:
            return conn.execute(delete(mn).where(mn.c.uuid == uuid, mn.c.heartbeat < self._cutoff())).rowcount == 1

    def evict_expired(self, uuid: str) -> bool:
        """Delete the row of an MN whose Lease expired or went, fresh heartbeat or not (it may reach the DB but not
        the API server). Only a RUNNING row goes: one still JOINING takes its Lease before it counts, and a
        LEAVING one deletes its row itself. True for the one MN whose DELETE matched."""
        with self.engine.begin() as conn:
            return conn.execute(delete(mn).where(mn.c.uuid == uuid, mn.c.state == RUNNING)).rowcount == 1

    def remove(self, uuid: str) -> bool:
        """Delete this MN's own row (graceful leave, or cleanup after fencing)."""
        with self.engine.begin() as conn:
            return conn.execute(delete(mn).where(mn.c.uuid == uuid)).rowcount == 1
