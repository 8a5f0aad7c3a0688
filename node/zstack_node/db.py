"""Database engine and schema migrations.

Migrations are numbered SQL steps applied in order under a PostgreSQL advisory lock, so any
number of MNs may start at once and each step runs exactly once. Later features append steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    text,
)
from sqlalchemy.engine import Connection

from zstack_node.cloud.schema import v2_cloud

log = logging.getLogger(__name__)

metadata = MetaData()

management_nodes = Table(
    "management_nodes",
    metadata,
    Column("uuid", String(32), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("address", String(255)),
    Column("state", String(16), nullable=False),
    Column("join_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("heartbeat", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

schema_version = Table("zstack_schema_version", metadata, Column("version", Integer, nullable=False))

# An arbitrary constant: the advisory lock key that serialises migrations across MNs.
_MIGRATION_LOCK = 0x7A57AC4


def _v1_membership(conn: Connection) -> None:
    management_nodes.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1_membership, v2_cloud]


def make_engine(url: str) -> Engine:
    """An engine whose connections fail fast, so an unreachable DB is noticed within seconds."""
    return create_engine(
        url,
        pool_size=5,
        max_overflow=5,
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args={"connect_timeout": 3, "options": "-c statement_timeout=5000"},
    )


def migrate(engine: Engine) -> int:
    """Bring the schema to the newest version; return that version."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(schema_version.select()).scalar()
        if current is None:
            conn.execute(schema_version.insert().values(version=0))
            current = 0
        for number, step in enumerate(MIGRATIONS[current:], start=current + 1):
            log.info("applying schema migration %d (%s)", number, step.__name__.lstrip("_"))
            step(conn)
            conn.execute(schema_version.update().values(version=number))
        return len(MIGRATIONS)
