"""Fixtures for multi-process MN tests against the session's real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.mn_processes import MnProcesses
from tests.node.probe import BusProbe

DEMO = "tests.node.demo_service:DemoService"


class Cluster(MnProcesses):
    """MN processes hosting the demo service, sharing one fresh database, plus what the service recorded."""

    services = (DEMO,)

    def __init__(self, broker_url: str, database_url: str, workdir: Path) -> None:
        super().__init__(broker_url, database_url, workdir)
        self.keys = [uuid.uuid4().hex for _ in range(300)]
        (workdir / "keys").write_text("\n".join(self.keys))
        self.records_path = workdir / "records.jsonl"

    def node_env(self) -> dict[str, str]:
        return {**super().node_env(), "DEMO_KEYS_FILE": str(self.workdir / "keys"),
                "DEMO_RECORD_FILE": str(self.records_path)}

    def records(self, event: str) -> list[dict]:
        if not self.records_path.exists():
            return []
        rows = [json.loads(line) for line in self.records_path.read_text().splitlines()]
        return [r for r in rows if r["event"] == event]


@pytest.fixture
def cluster(rabbitmq, fresh_database, tmp_path) -> Iterator[Cluster]:
    made = Cluster(rabbitmq.url, fresh_database, tmp_path)
    yield made
    made.kill_all()


@pytest.fixture
def probe(rabbitmq) -> Iterator[BusProbe]:
    client = BusProbe(rabbitmq.url)
    yield client
    client.close()


@pytest.fixture
def probe_factory(rabbitmq) -> Iterator[Callable[[], BusProbe]]:
    made: list[BusProbe] = []

    def make() -> BusProbe:
        made.append(BusProbe(rabbitmq.url))
        return made[-1]

    yield make
    for client in made:
        client.close()
