"""Database engine and the schema migration runner.

Migrations are numbered SQL steps applied in order under a PostgreSQL advisory lock, so any
number of MNs may start at once and each step runs exactly once. The steps themselves belong to
their packages; schema.py lists them in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

schema_version = Table("zstack_schema_version", MetaData(), Column("version", Integer, nullable=False))

# An arbitrary constant: the advisory lock key that serialises migrations across MNs.
_MIGRATION_LOCK = 0x7A57AC4

Migration = Callable[[Connection], None]


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


def migrate(engine: Engine, steps: Sequence[Migration]) -> int:
    """Bring the schema to the newest version (the number of `steps`); return that version."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(schema_version.select()).scalar()
        if current is None:
            conn.execute(schema_version.insert().values(version=0))
            current = 0
        for number, step in enumerate(steps[current:], start=current + 1):
            log.info("applying schema migration %d (%s)", number, step.__name__.lstrip("_"))
            step(conn)
            conn.execute(schema_version.update().values(version=number))
        return len(steps)
