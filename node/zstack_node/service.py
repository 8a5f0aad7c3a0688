"""The service extension point: message handlers plus the four takeover hooks.

A service is a class with a `name` (its queue is `zstack.message.<name>.<mnUuid>`), methods
marked `@handles("MessageType")`, and any of the hooks below. Handlers return a JSON-able dict
(the reply body of a call) and raise `ServiceError` for a clean error reply. A service is built with a
`ServiceContext`, its narrow view of the MN: never the ManagementNode itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from zstack_node.bus.endpoint import Handler, ServiceError
from zstack_node.ring import Ring, RingChange

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from zstack_node.bus.cloudbus import CloudBus
    from zstack_node.config import Settings

__all__ = ["Handler", "Service", "ServiceContext", "ServiceError", "handles"]


class ServiceContext:
    """What a service may use of the MN that hosts it, and nothing more: the bus, the database, the
    settings, this MN's identity and state, its current ring, and its sibling services. The values that
    change (UUID, state, ring) are read live from the MN that built the context."""

    def __init__(self, *, bus: CloudBus, engine: Engine, settings: Settings, uuid: Callable[[], str | None],
                 state: Callable[[], str], alive: Callable[[], bool], ring: Callable[[], Ring],
                 services: Mapping[str, Service]) -> None:
        self.bus, self.engine, self.settings = bus, engine, settings
        self._uuid, self._state, self._alive, self._ring = uuid, state, alive, ring
        self.services = services

    @property
    def uuid(self) -> str | None:
        """This MN's UUID now (None before it joined; a new one after a rejoin)."""
        return self._uuid()

    @property
    def state(self) -> str:
        """starting, joining, running, suspended, fenced, leaving or stopped (node.STATES)."""
        return self._state()

    def may_act(self) -> bool:
        """Whether this MN may act on the resources it owns now (agent calls, pings, job steps): running (or
        leaving, to finish its work) with a recent heartbeat. Ask right before acting: after a long pause
        (GC, SIGSTOP) the state lags until the watchdog runs, but this does not."""
        return self._alive()

    @property
    def ring(self) -> Ring:
        return self._ring()

    def owner(self, resource_uuid: str) -> str:
        return self._ring().owner(resource_uuid)


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

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

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
