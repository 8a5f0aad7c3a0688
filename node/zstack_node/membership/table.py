"""Membership in PostgreSQL: the MN table, heartbeats by the database's clock, and eviction.

Every method is synchronous (SQLAlchemy + psycopg2); the node runs them in a worker thread.
All time comparisons use the database's now(), so MNs with skewed clocks still agree.
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
    delete,
    func,
    insert,
    select,
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
)

RUNNING = "RUNNING"
JOINING = "JOINING"
LEAVING = "LEAVING"


def v1_membership(conn: Connection) -> None:
    """Schema step 1: the MN table."""
    mn.create(conn, checkfirst=True)


@dataclass(frozen=True)
class MemberRow:
    uuid: str
    hostname: str
    address: str | None
    state: str
    age: float  # seconds since the last heartbeat, by the DB clock


class Membership:
    """Reads and writes the `management_nodes` table."""

    def __init__(self, engine: Engine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout

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
        """Refresh this MN's heartbeat. False when the row is gone or already stale.

        A stale row is not revived: by then others may have dropped this MN from their rings,
        so it must fence itself and rejoin with a new UUID instead.
        """
        with self.engine.begin() as conn:
            result = conn.execute(
                update(mn).where(mn.c.uuid == uuid, mn.c.heartbeat >= self._cutoff()).values(heartbeat=func.now())
            )
            return result.rowcount == 1

    def members(self) -> list[MemberRow]:
        """Every row, with its heartbeat age by the DB clock."""
        age = func.extract("epoch", func.now() - mn.c.heartbeat).label("age")
        with self.engine.connect() as conn:
            rows = conn.execute(select(mn.c.uuid, mn.c.hostname, mn.c.address, mn.c.state, age))
            return [MemberRow(r.uuid, r.hostname, r.address, r.state, float(r.age)) for r in rows]

    def evict(self, uuid: str) -> bool:
        """Delete a stale MN's row. Only a still-stale row goes, so a duplicate eviction is a no-op."""
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
