"""Fixtures for the cloud API tests: MN processes (with the default cloud services) on the session's
real RabbitMQ and PostgreSQL, an HTTP client per MN, and SQL access to the shared database."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from tests.fixtures.mn_processes import MnProcesses
from zstack_devcluster.localnodes import LocalNode, wait_until

TOKEN = "test-token-" + uuid.uuid4().hex[:8]
TERMINAL = ("Succeeded", "Failed")


class Api:
    """A tiny client of one MN's REST API."""

    def __init__(self, base: str, token: str | None = TOKEN) -> None:
        self.base = base
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 90)
        return self.session.request(method, self.base + path, **kwargs)

    def ok(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def submit(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        """A 202 call: the accepted job."""
        return self.ok(method, path, 202, json=json)["job"]

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.ok("GET", f"/v1/jobs/{job_id}?wait=10", 200)
            return job if job["state"] in TERMINAL else None

        return wait_until(done, timeout, f"job {job_id} to end", interval=0.05)

    def run(self, method: str, path: str, json: Any = None, timeout: float = 60.0) -> dict[str, Any]:
        """Submit and wait; the terminal job."""
        return self.wait(self.submit(method, path, json)["id"], timeout)

    def add_host(self, cpu: int = 64, memory: int = 262144, name: str | None = None) -> dict[str, Any]:
        job = self.run("POST", "/v1/hosts", {"name": name or f"host-{uuid.uuid4().hex[:6]}", "cpu": cpu,
                                             "memory": memory})
        assert job["state"] == "Succeeded", job
        return job["result"]


class CloudCluster(MnProcesses):
    """MN processes with the cloud services, sharing one fresh database and broker, plus SQL access to it."""

    def __init__(self, broker_url: str, database_url: str, workdir: Path) -> None:
        super().__init__(broker_url, database_url, workdir)
        self.engine: Engine = create_engine(database_url, pool_size=2)

    def node_env(self) -> dict[str, str]:
        return {**super().node_env(), "ZSTACK_API_TOKEN": TOKEN, "ZSTACK_SIM_LATENCY": "0.002"}

    def api(self, node: LocalNode | None = None) -> Api:
        return Api((node or random.choice(self.running())).url)

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            result = conn.execute(text(query), params)
            return list(result) if result.returns_rows else []


@pytest.fixture
def cloud(rabbitmq, fresh_database, tmp_path) -> Iterator[CloudCluster]:
    made = CloudCluster(rabbitmq.url, fresh_database, tmp_path)
    yield made
    made.kill_all()
    made.engine.dispose()


def host_accounting(cloud: CloudCluster) -> list[tuple[str, int, int, int, int]]:
    """Hosts whose used capacity differs from the sum of their live VMs (and migration targets)."""
    return cloud.sql(
        "SELECT h.uuid, h.cpu_used, COALESCE(SUM(v.cpu), 0), h.memory_used, COALESCE(SUM(v.memory), 0)"
        " FROM hosts h LEFT JOIN vm_instances v ON v.state <> 'Destroyed'"
        " AND (v.host_uuid = h.uuid OR v.migrate_to = h.uuid)"
        " GROUP BY h.uuid HAVING h.cpu_used <> COALESCE(SUM(v.cpu), 0) OR h.memory_used <> COALESCE(SUM(v.memory), 0)")


def duplicate_changes(cloud: CloudCluster) -> list[tuple[str, str, int]]:
    """(job, state, count) for every job that moved a VM into the same state more than once."""
    return cloud.sql("SELECT job_id, to_state, COUNT(*) FROM vm_history GROUP BY job_id, to_state"
                     " HAVING COUNT(*) > 1")
