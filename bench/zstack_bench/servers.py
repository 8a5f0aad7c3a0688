"""Use the broker and database a URL names, or start private ones for the length of a benchmark."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from zstack_devcluster.services import PostgreSQL, RabbitMQ, Service

PodNetwork = tuple[str, str]  # (address, clients) of Service.serve_pods: where pods reach this machine, their network


@contextlib.contextmanager
def _url_or_private(url: str | None, server_class: type[Service], what: str, say: Callable[[str], None],
                    pods: PodNetwork | None = None) -> Iterator[str]:
    """Yield `url`, or the URL of a private server started now and stopped on exit. With `pods`, the private
    server also serves the pods of a container node and the URL is the one they use (`url` is kept as given)."""
    if url:
        yield url
        return
    say(f"no {what} URL given: starting a private {server_class.__name__}")
    with tempfile.TemporaryDirectory(prefix="zstack-bench-") as tmp:
        server = server_class(Path(tmp) / server_class.__name__.lower(), say=say)
        if pods is not None:
            server.serve_pods(*pods)  # before start(): it listens there from its first start
        with server:
            yield server.url if pods is None else server.url_for_pods(server.url)


def broker(url: str | None, say: Callable[[str], None],
           pods: PodNetwork | None = None) -> contextlib.AbstractContextManager[str]:
    return _url_or_private(url, RabbitMQ, "broker", say, pods)


def database(url: str | None, say: Callable[[str], None],
             pods: PodNetwork | None = None) -> contextlib.AbstractContextManager[str]:
    return _url_or_private(url, PostgreSQL, "database", say, pods)
