"""The service extension point: message handlers plus the four takeover hooks.

A service is a class with a `name` (its queue is `zstack.message.<name>.<mnUuid>`), methods
marked `@handles("MessageType")`, and any of the hooks below. Handlers return a JSON-able dict
(the reply body of a call) and raise `ServiceError` for a clean error reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from zstack_node.bus.envelope import Envelope
from zstack_node.ring import Ring, RingChange

if TYPE_CHECKING:
    from zstack_node.node import ManagementNode

Handler = Callable[[Envelope], Awaitable[dict[str, Any] | None]]


class ServiceError(Exception):
    """An error a handler reports to its caller, with a stable machine-readable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


def handles(message_type: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a service method as the handler of `message_type`."""

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        method.__zstack_handles__ = message_type  # type: ignore[attr-defined]
        return method

    return mark


class Service:
    """Base class of every service an MN hosts."""

    name: ClassVar[str]
    _handler_names: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handler_names = {
            attr.__zstack_handles__: attr_name
            for klass in reversed(cls.__mro__)
            for attr_name, attr in vars(klass).items()
            if hasattr(attr, "__zstack_handles__")
        }

    def __init__(self, node: ManagementNode) -> None:
        self.node = node

    def handler(self, message_type: str) -> Handler | None:
        name = self._handler_names.get(message_type)
        return getattr(self, name) if name else None

    def add_routes(self, app: web.Application) -> None:
        """Add this service's HTTP routes to the MN's one port (the cloud API does)."""

    async def on_self_joined(self, ring: Ring) -> None:
        """This MN joined (or rejoined with a new UUID); `ring` is its first ring."""

    async def on_node_joined(self, change: RingChange) -> None:
        """Another MN joined; resources it now owns are no longer ours."""

    async def on_node_left(self, change: RingChange) -> None:
        """Another MN left or was evicted; take over what `change.gained_by(self)` names."""

    async def on_self_dead(self) -> None:
        """This MN fenced itself or is leaving: stop acting on the resources it owned."""
