"""Fixtures for multi-process MN tests against the session's real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devcluster.localnodes import LocalNode, agreed_members, wait_until
from tests.node.probe import BusProbe

REPO = Path(__file__).resolve().parents[2]
DEMO = "tests.node.demo_service:DemoService"


class Cluster:
    """MN processes sharing one fresh database, plus what the demo service recorded."""

    def __init__(self, broker_url: str, database_url: str, workdir: Path) -> None:
        self.broker_url = broker_url
        self.database_url = database_url
        self.workdir = workdir
        self.keys = [uuid.uuid4().hex for _ in range(300)]
        (workdir / "keys").write_text("\n".join(self.keys))
        self.records_path = workdir / "records.jsonl"
        self.nodes: list[LocalNode] = []

    def start(self, count: int, **options: object) -> list[LocalNode]:
        started = []
        for _ in range(count):
            node = LocalNode(
                name=f"mn{len(self.nodes)}", broker_url=self.broker_url, database_url=self.database_url,
                log_dir=self.workdir, services=(DEMO,), options=options,
                env={"PYTHONPATH": str(REPO), "DEMO_KEYS_FILE": str(self.workdir / "keys"),
                     "DEMO_RECORD_FILE": str(self.records_path)},
            ).start()
            self.nodes.append(node)
            started.append(node)
        for node in started:
            node.wait_ready()
        return started

    def running(self) -> list[LocalNode]:
        return [n for n in self.nodes if n.process and n.process.poll() is None]

    def wait_agreed(self, expected: set[str] | None = None, timeout: float = 10.0) -> frozenset[str]:
        """Wait until every running MN reports the same members (and, if given, exactly `expected`)."""
        def agreed() -> frozenset[str] | None:
            members = agreed_members(self.running())
            return members if members and (expected is None or members == expected) else None

        return wait_until(agreed, timeout, f"running MNs to agree on {sorted(expected or [])}")

    def records(self, event: str) -> list[dict]:
        if not self.records_path.exists():
            return []
        rows = [json.loads(line) for line in self.records_path.read_text().splitlines()]
        return [r for r in rows if r["event"] == event]

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.tail(40)}" for n in self.nodes)


@pytest.fixture
def cluster(rabbitmq, fresh_database, tmp_path) -> Iterator[Cluster]:
    made = Cluster(rabbitmq.url, fresh_database, tmp_path)
    yield made
    for node in made.nodes:
        node.kill()


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
