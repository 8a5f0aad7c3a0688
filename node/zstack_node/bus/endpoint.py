"""What the bus serves: a named set of message handlers, and the error a handler replies with.

A `zstack_node.service.Service` is one; the bus needs no more of it than this, so it never imports the
service layer above it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from zstack_node.bus.envelope import Envelope

Handler = Callable[[Envelope], Awaitable[dict[str, Any] | None]]


class ServiceError(Exception):
    """An error a handler reports to its caller, with a stable machine-readable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class Endpoint(Protocol):
    """A service as the bus sees it: its queue name and its handler of each message type."""

    name: str

    def handler(self, message_type: str) -> Handler | None: ...
