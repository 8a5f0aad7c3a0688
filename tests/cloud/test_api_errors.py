"""How the API answers errors that are not the client's: only an unreachable database is a 503.

The API runs in this process on an aiohttp test server; the database call behind GET /v1/hosts is
replaced by one that raises, since a real database error of each kind cannot be ordered on demand.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import create_engine
from sqlalchemy.exc import DataError, DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from zstack_node.cloud import repo
from zstack_node.cloud.api import ApiService
from zstack_node.cloud.settings import CloudSettings

TOKEN = "t0ken"


class Bus:
    def subscribe(self, _topic: str, _callback: Any) -> None:
        pass


class Context:
    """What the API reads of its ServiceContext (no broker or ring needed for a read)."""

    def __init__(self) -> None:
        self.engine = create_engine("sqlite://")
        self.settings = SimpleNamespace(api_token=TOKEN, api_token_file=None, cloud=CloudSettings())
        self.bus = Bus()
        self.uuid = None
        self.state = "running"


def orig(text: str) -> Exception:
    return Exception(text)


@pytest.mark.parametrize("error, status, code", [
    (OperationalError("SELECT 1", {}, orig("server closed the connection unexpectedly")), 503, "unavailable"),
    (InterfaceError("SELECT 1", {}, orig("connection already closed")), 503, "unavailable"),
    (DisconnectionError("the pool's connection was invalidated"), 503, "unavailable"),
    (PoolTimeout("QueuePool limit of size 5 overflow 5 reached"), 503, "unavailable"),
    (DataError("SELECT 1", {}, orig("value too long for type character varying(32)")), 500, "internal_error"),
    (IntegrityError("INSERT", {}, orig("duplicate key")), 500, "internal_error"),
    (KeyError("uuid"), 500, "internal_error"),
])
def test_only_connection_errors_are_503(monkeypatch, caplog, error, status, code):
    def fail(_conn: Any, *_args: Any) -> None:
        raise error

    monkeypatch.setattr(repo, "list_hosts", fail)
    context = Context()

    async def call() -> tuple[int, dict[str, Any]]:
        app = web.Application()
        ApiService(context).add_routes(app)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/hosts", headers={"Authorization": f"Bearer {TOKEN}"})
            return response.status, await response.json()

    with caplog.at_level(logging.WARNING, logger="zstack_node.cloud.api"):
        got_status, body = asyncio.run(call())
    context.engine.dispose()
    assert (got_status, body["error"]["code"]) == (status, code), body
    if status == 500:
        assert "duplicate key" not in body["error"]["message"], "internals stay in the log"
        assert any(r.exc_info for r in caplog.records), "a 500 is logged with its traceback"
