"""The job runner's queries on the real database: the sweeper's candidate query."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from zstack_node.cloud import repo
from zstack_node.db import migrate


@pytest.fixture
def engine(fresh_database) -> Engine:
    made = create_engine(fresh_database)
    migrate(made)
    yield made
    made.dispose()


def sql(engine: Engine, query: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.execute(text(query), params)
        return list(result) if result.returns_rows else []


def add_job(engine: Engine, operation: str, resource: str, *, mn: str | None = None,
            parameters: dict[str, Any] | None = None) -> str:
    job = uuid.uuid4().hex
    sql(engine, "INSERT INTO jobs (id, operation, resource_uuid, parameters, state, mn)"
                " VALUES (:j, :o, :r, CAST(:p AS jsonb), :s, :m)",
        j=job, o=operation, r=resource, p=json.dumps(parameters or {}), s="Running" if mn else "Pending", m=mn)
    return job


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
