"""Database engine and the schema migration runner.

Migrations are numbered SQL steps applied in order under a PostgreSQL advisory lock, so any
number of MNs may start at once and each step runs exactly once. The steps themselves belong to
their packages; schema.py lists them in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DisconnectionError

log = logging.getLogger(__name__)

schema_version = Table("zstack_schema_version", MetaData(), Column("version", Integer, nullable=False))

# An arbitrary constant: the advisory lock key that serialises migrations across MNs.
_MIGRATION_LOCK = 0x7A57AC4

# A pooled connection idle for longer than this is pinged before use. One used more recently was
# alive a moment ago: a ping on every checkout (pool_pre_ping) cost a round trip per transaction,
# about a tenth of the statements of a VM create.
PING_AFTER_IDLE = 1.0

Migration = Callable[[Connection], None]


def make_engine(url: str) -> Engine:
    """An engine whose connections fail fast, so an unreachable DB is noticed within seconds."""
    engine = create_engine(
        url,
        pool_size=5,
        max_overflow=5,
        pool_timeout=5,
        connect_args={"connect_timeout": 3, "options": "-c statement_timeout=5000"},
    )
    _ping_idle_connections(engine)
    return engine


def _ping_idle_connections(engine: Engine) -> None:
    """pool_pre_ping, for connections that sat in the pool over PING_AFTER_IDLE seconds only.

    A dead connection (the server restarted, the network dropped it) fails its ping and the pool
    replaces it; a connection that dies while in use fails its statement, and SQLAlchemy then
    invalidates every pooled connection older than that failure, so none of them is used again.
    """

    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return  # new, or back in the pool only a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc


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
