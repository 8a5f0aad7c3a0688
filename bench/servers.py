"""Use the broker and database a URL names, or start private ones for the length of a benchmark."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zstack-bench-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def broker(url: str | None, say: Callable[[str], None]) -> Iterator[str]:
    """Yield `url`, or the URL of a private RabbitMQ started now and stopped on exit."""
    if url:
        yield url
        return
    from devcluster.services import RabbitMQ

    say("no broker URL given: starting a private RabbitMQ")
    with _scratch() as tmp, RabbitMQ(tmp / "rabbitmq", say=say) as server:
        yield server.url


@contextlib.contextmanager
def database(url: str | None, say: Callable[[str], None]) -> Iterator[str]:
    """Yield `url`, or the URL of a private PostgreSQL started now and stopped on exit."""
    if url:
        yield url
        return
    from devcluster.services import PostgreSQL

    say("no database URL given: starting a private PostgreSQL")
    with _scratch() as tmp, PostgreSQL(tmp / "postgres", say=say) as server:
        yield server.url
