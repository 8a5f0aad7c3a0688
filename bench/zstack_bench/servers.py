"""Use the broker and database a URL names, or start private ones for the length of a benchmark."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from zstack_devcluster.services import PostgreSQL, RabbitMQ, Service


@contextlib.contextmanager
def _url_or_private(url: str | None, server_class: type[Service], what: str,
                    say: Callable[[str], None]) -> Iterator[str]:
    """Yield `url`, or the URL of a private server started now and stopped on exit."""
    if url:
        yield url
        return
    say(f"no {what} URL given: starting a private {server_class.__name__}")
    with tempfile.TemporaryDirectory(prefix="zstack-bench-") as tmp, \
            server_class(Path(tmp) / server_class.__name__.lower(), say=say) as server:
        yield server.url


def broker(url: str | None, say: Callable[[str], None]) -> contextlib.AbstractContextManager[str]:
    return _url_or_private(url, RabbitMQ, "broker", say)


def database(url: str | None, say: Callable[[str], None]) -> contextlib.AbstractContextManager[str]:
    return _url_or_private(url, PostgreSQL, "database", say)
