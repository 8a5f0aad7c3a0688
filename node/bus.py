"""The cloud bus: RabbitMQ topology, routing by the ring, calls, events, re-routing.

Topology (names in DESIGN.md):
- `zstack.message.p2p` (direct) carries every point-to-point message; its routing key is the
  target queue's name. Its alternate exchange catches a message whose queue no longer exists
  (its MN died) into the durable `zstack.message.unroutable` queue, which every MN consumes and
  re-routes once its ring no longer holds the dead MN.
- Per MN and service: `zstack.message.<service>.<mnUuid>`, exclusive, so it dies with its MN.
- Per MN: the reply queue `zstack.message.cloudbus.<mnUuid>` and an event queue on the topic
  exchange `zstack.event`.
- `zstack.message.api.portal`: durable, competing consumers, publisher confirms.
- `zstack.message.deadletter`: malformed messages, one log line each.

Which calls are repeated: a call pending on an MN that leaves the ring is re-sent to the new
owner when its envelope says `idempotent=True` (reads, and operations keyed by a job id that
the handler de-duplicates). Every other pending call fails at once with `TargetLeft`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from pika import BasicProperties
from pika.channel import Channel as PikaChannel
from pika.spec import Basic

from . import metrics
from .amqp import BrokerUnavailable, Channel, Connection
from .config import redact
from .eager import start_eagerly
from .envelope import MAX_HOPS, Envelope, MalformedMessage
from .ring import EmptyRingError, Ring, RingChange
from .service import Service, ServiceError

log = logging.getLogger(__name__)

P2P_EXCHANGE = "zstack.message.p2p"
UNROUTABLE_EXCHANGE = "zstack.message.unroutable"
UNROUTABLE_QUEUE = "zstack.message.unroutable"
EVENT_EXCHANGE = "zstack.event"
DEAD_LETTER_EXCHANGE = "zstack.message.deadletter"
DEAD_LETTER_QUEUE = "zstack.message.deadletter"
API_QUEUE = "zstack.message.api.portal"
API_SERVICE = "api.portal"
REPLY_SERVICE = "cloudbus"
_PREFIX = "zstack.message."
_PERSISTENT = BasicProperties(delivery_mode=2)
_FIXED_LABELS = frozenset((API_SERVICE, "event", REPLY_SERVICE))


def service_queue(service: str, mn_uuid: str) -> str:
    return f"{_PREFIX}{service}.{mn_uuid}"


def reply_queue(mn_uuid: str) -> str:
    return service_queue(REPLY_SERVICE, mn_uuid)


def event_queue(mn_uuid: str) -> str:
    return f"zstack.event.{mn_uuid}"


def _split_queue(name: str) -> tuple[str, str] | None:
    """`zstack.message.<service>.<mn>` -> (service, mn); None for any other name."""
    if not name.startswith(_PREFIX):
        return None
    service, _, mn = name[len(_PREFIX):].rpartition(".")
    return (service, mn) if service and len(mn) == 32 else None


class BusError(Exception):
    """A call did not produce a reply body. `code` is stable for programs."""

    code = "BusError"


class CallTimeout(BusError):
    code = "Timeout"


class TargetLeft(BusError):
    code = "TargetLeft"


class NotServing(BusError):
    code = "NotServing"


class RemoteError(BusError):
    """The handler answered with an error."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        super().__init__(error.get("message", "remote error"))
        self.code = str(error.get("code", "RemoteError"))


@dataclass
class _PendingCall:
    envelope: Envelope
    target: str  # MN UUID the call was routed to
    future: asyncio.Future[Envelope]
    started: float


EventCallback = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class CloudBus:
    """One MN's connection to the bus. Runs on the node's event loop."""

    def __init__(self, url: str, *, ring: Callable[[], Ring], may_serve: Callable[[], bool],
                 call_timeout: float = 10.0, reroute_wait: float = 30.0) -> None:
        self.url = url
        self._ring = ring
        self._may_serve = may_serve
        self.call_timeout = call_timeout
        self.reroute_wait = reroute_wait
        self.self_uuid: str | None = None
        self._services: Mapping[str, Service] = {}
        self._subscriptions: dict[str, list[EventCallback]] = {}
        self._conn: Connection | None = None
        self._ch: Channel | None = None  # auto-ack consumers and plain publishes
        self._work_ch: Channel | None = None  # manual-ack consumers (api.portal, unroutable)
        self._confirm_ch: Channel | None = None  # confirmed publishes
        self._api_tag: str | None = None
        self._pending: dict[str, _PendingCall] = {}
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._ring_changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._last_delivery = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        """Connect (retrying with back-off, logging what it waits for) and keep reconnecting."""
        self._supervisor = asyncio.create_task(self._supervise(), name="bus-supervisor")
        await self.wait_connected()

    async def wait_connected(self) -> None:
        waiter = asyncio.create_task(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._supervisor}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            self._supervisor.result()  # re-raise why the supervisor died

    async def _supervise(self) -> None:
        delay, attempt = 0.2, 0
        while not self._stopping:
            try:
                conn = await Connection.open(self.url, name=f"zstack-node {self.self_uuid or ''}".strip())
            except BrokerUnavailable as exc:
                attempt += 1
                log.warning("waiting for the broker at %s: %s (attempt %d, next try in %.1fs)",
                            redact(self.url), exc, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                await self._setup(conn)
            except BrokerUnavailable as exc:
                log.warning("broker connection failed during setup: %s", exc)
                await conn.close()
                continue
            if attempt:
                log.info("connected to the broker at %s after %d attempt(s)", redact(self.url), attempt + 1)
            delay, attempt = 0.2, 0
            self._connected.set()
            reason = await conn.closed
            self._connected.clear()
            if self._stopping:
                return
            log.warning("lost the broker connection (%s); reconnecting", reason)
            self._after_connection_loss()

    async def _setup(self, conn: Connection) -> None:
        """Declare the shared topology, then this MN's queues when it is serving."""
        self._conn = conn
        self._ch = await conn.channel()
        self._work_ch = await conn.channel()
        self._confirm_ch = await conn.channel()
        await self._confirm_ch.enable_confirms()
        await self._work_ch.qos(64)
        ch = self._ch
        await ch.exchange(UNROUTABLE_EXCHANGE, "fanout")
        await ch.exchange(DEAD_LETTER_EXCHANGE, "fanout")
        await ch.exchange(P2P_EXCHANGE, "direct", arguments={"alternate-exchange": UNROUTABLE_EXCHANGE})
        await ch.exchange(EVENT_EXCHANGE, "topic")
        await ch.queue(UNROUTABLE_QUEUE, durable=True)
        await ch.bind(UNROUTABLE_QUEUE, UNROUTABLE_EXCHANGE, "")
        await ch.queue(DEAD_LETTER_QUEUE, durable=True)
        await ch.bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "")
        await ch.queue(API_QUEUE, durable=True)
        await ch.bind(API_QUEUE, P2P_EXCHANGE, API_QUEUE)
        await self._work_ch.consume(UNROUTABLE_QUEUE, self._on_unroutable, auto_ack=False)
        if self.self_uuid:
            await self._declare_own_queues(self.self_uuid)

    async def _declare_own_queues(self, mn_uuid: str) -> None:
        ch = self._ch
        own = [service_queue(name, mn_uuid) for name in self._services]
        for queue in own:
            await ch.queue(queue, exclusive=True)
            await ch.bind(queue, P2P_EXCHANGE, queue)
            await ch.consume(queue, self._on_service_message, auto_ack=True)
        replies = reply_queue(mn_uuid)
        await ch.queue(replies, exclusive=True)
        await ch.bind(replies, P2P_EXCHANGE, replies)
        await ch.consume(replies, self._on_reply, auto_ack=True)
        events = event_queue(mn_uuid)
        await ch.queue(events, exclusive=True)
        for pattern in self._subscriptions:
            await ch.bind(events, EVENT_EXCHANGE, pattern)
        await ch.consume(events, self._on_event, auto_ack=True)
        self._api_tag = await self._work_ch.consume(API_QUEUE, self._on_api, auto_ack=False)

    def _after_connection_loss(self) -> None:
        """Replies may have been lost with the reply queue: repeat what is safe, fail the rest."""
        for corr, pending in list(self._pending.items()):
            if pending.envelope.idempotent:
                self._spawn(self._resend_when_connected(corr))
            else:
                self._fail(corr, BrokerUnavailable("lost the broker connection while waiting for the reply"))

    async def _resend_when_connected(self, corr: str) -> None:
        await self._connected.wait()
        pending = self._pending.get(corr)
        if pending is not None:
            self._route_and_publish(pending.envelope, pending)

    async def serve(self, mn_uuid: str, services: Mapping[str, Service]) -> None:
        """Become `mn_uuid`: declare its queues and start consuming them and the API queue."""
        self.self_uuid = mn_uuid
        self._services = services
        await self.wait_connected()
        await self._declare_own_queues(mn_uuid)

    async def drain(self, grace: float) -> None:
        """Stop taking new work and let the work in flight finish (graceful leave, step 1-2).

        Unbinding the service queues makes new messages for this MN unroutable, so they are
        caught and re-routed once the ring drops it; what is already queued is still served.
        """
        if not (self.self_uuid and self.connected):
            return
        try:
            if self._api_tag:
                await self._work_ch.cancel(self._api_tag)
                self._api_tag = None
            for name in self._services:
                queue = service_queue(name, self.self_uuid)
                await self._ch.unbind(queue, P2P_EXCHANGE, queue)
        except BrokerUnavailable:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_delivery > 0.05
            if quiet and not self._in_flight:
                return
            await asyncio.sleep(0.01)
        log.warning("%d handler(s) still running after the %.1fs grace period", len(self._in_flight), grace)

    async def stop_serving(self, reason: str) -> None:
        """Drop this MN's identity: its queues go with the connection, pending calls fail."""
        self.self_uuid = None
        for corr in list(self._pending):
            self._fail(corr, NotServing(f"this MN stopped serving ({reason})"))
        for task in list(self._in_flight):
            task.cancel()
        if self._conn is not None and self._conn.is_open:
            await self._conn.close()  # the supervisor reconnects with the shared topology only

    async def close(self) -> None:
        self._stopping = True
        for corr in list(self._pending):
            self._fail(corr, NotServing("the bus is closing"))
        if self._conn is not None and self._conn.is_open:
            await self._conn.close()
        if self._supervisor is not None:
            self._supervisor.cancel()

    # ---- sending ---------------------------------------------------------------------------

    def _owner(self, envelope: Envelope) -> str:
        if envelope.resource is None:
            return self._require_self()
        try:
            return self._ring().owner(envelope.resource)
        except EmptyRingError:
            return self._require_self()

    def _require_self(self) -> str:
        if self.self_uuid is None:
            raise NotServing("this MN is not serving: it has no identity on the bus yet")
        return self.self_uuid

    def _publish(self, queue: str, envelope: Envelope) -> None:
        if self._ch is None or not self.connected:
            raise BrokerUnavailable("not connected to the broker")
        self._ch.publish(P2P_EXCHANGE, queue, envelope.encode())
        metrics.count(metrics.MESSAGES_SENT, self._label(envelope.service), envelope.kind)

    def _route_and_publish(self, envelope: Envelope, pending: _PendingCall | None = None) -> str:
        target = self._owner(envelope)
        if pending is not None:
            pending.target = target
        self._publish(service_queue(envelope.service, target), envelope)
        return target

    def send(self, service: str, message_type: str, body: dict[str, Any] | None = None, *,
             resource: str | None = None) -> None:
        """Fire and forget, to the owner of `resource` (or this MN when there is none)."""
        envelope = Envelope(message_type, service, "send", body or {}, resource, sender=self.self_uuid)
        self._route_and_publish(envelope)

    async def call(self, service: str, message_type: str, body: dict[str, Any] | None = None, *,
                   resource: str | None = None, timeout: float | None = None,
                   idempotent: bool = False) -> dict[str, Any]:
        """Request/reply with the owner of `resource`; raise a BusError subclass on failure."""
        timeout = self.call_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        me = self._require_self()
        envelope = Envelope(
            message_type, service, "call", body or {}, resource,
            correlation=_new_id(), reply_to=reply_queue(me), deadline=time.time() + timeout,
            sender=me, idempotent=idempotent,
        )
        future: asyncio.Future[Envelope] = loop.create_future()
        pending = _PendingCall(envelope, "", future, time.perf_counter())
        self._pending[envelope.correlation] = pending
        expiry = loop.call_later(timeout, self._fail, envelope.correlation, CallTimeout(
            f"{service}/{message_type} for {resource or 'this MN'} got no reply within {timeout:g}s"))
        try:
            self._route_and_publish(envelope, pending)
            reply = await future
        finally:
            expiry.cancel()
            self._pending.pop(envelope.correlation, None)
        metrics.child(metrics.CALL_SECONDS, service).observe(time.perf_counter() - pending.started)
        if reply.error is not None:
            raise RemoteError(reply.error)
        return reply.body

    def _fail(self, corr: str, error: Exception) -> None:
        pending = self._pending.pop(corr, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(error)

    async def send_api(self, service: str, message_type: str, body: dict[str, Any], *,
                       resource: str | None = None) -> None:
        """Publish an API message on the shared, durable API queue; return once the broker has it."""
        if self._confirm_ch is None or not self.connected:
            raise BrokerUnavailable("not connected to the broker")
        envelope = Envelope(message_type, service, "api", body, resource, sender=self.self_uuid)
        await self._confirm_ch.publish_confirmed(P2P_EXCHANGE, API_QUEUE, envelope.encode(), _PERSISTENT)
        metrics.count(metrics.MESSAGES_SENT, API_SERVICE, "api")

    def publish_event(self, topic: str, body: dict[str, Any]) -> None:
        if self._ch is None or not self.connected:
            raise BrokerUnavailable("not connected to the broker")
        envelope = Envelope(topic, "event", "event", body, sender=self.self_uuid)
        self._ch.publish(EVENT_EXCHANGE, topic, envelope.encode())
        metrics.count(metrics.MESSAGES_SENT, "event", "event")

    def subscribe(self, pattern: str, callback: EventCallback) -> None:
        """Call `callback(topic, body)` for every event matching the topic `pattern`.

        Subscribe before `serve`: bindings are made when this MN's event queue is declared.
        """
        self._subscriptions.setdefault(pattern, []).append(callback)

    # ---- ring changes ----------------------------------------------------------------------

    def ring_changed(self, change: RingChange) -> None:
        """Wake waiting re-routes; repeat or fail the calls pending on MNs that left."""
        self._ring_changed.set()
        self._ring_changed = asyncio.Event()
        if not change.left:
            return
        for corr, pending in list(self._pending.items()):
            if pending.target not in change.left:
                continue
            if pending.envelope.idempotent:
                pending.envelope = pending.envelope.hop()
                try:
                    self._route_and_publish(pending.envelope, pending)
                    metrics.count(metrics.REROUTES, self._label(pending.envelope.service), "target_left")
                except (BrokerUnavailable, NotServing) as exc:
                    self._fail(corr, exc)
            else:
                self._fail(corr, TargetLeft(
                    f"MN {pending.target} left the ring while handling {pending.envelope.service}/"
                    f"{pending.envelope.type}; it is not marked idempotent, so it was not repeated"))

    # ---- receiving -------------------------------------------------------------------------

    def _label(self, service: str) -> str:
        """A metric label from a message: known services by name, anything else as `other`."""
        return service if service in self._services or service in _FIXED_LABELS else "other"

    def _decode(self, body: bytes, source: str) -> Envelope | None:
        try:
            return Envelope.decode(body)
        except MalformedMessage as exc:
            self._dead_letter(body, source, str(exc))
            return None

    def _dead_letter(self, body: bytes, source: str, reason: str) -> None:
        log.warning("dead-lettered a message from %s: %s", source, reason)
        service = (_split_queue(source) or (source, ""))[0]
        metrics.count(metrics.MESSAGES_REJECTED, self._label(service), "malformed")
        if self._ch is not None and self._ch.is_open:
            headers = {"x-zstack-reason": reason, "x-zstack-source": source}
            self._ch.publish(DEAD_LETTER_EXCHANGE, "", body, BasicProperties(headers=headers))

    def _on_service_message(self, _ch: PikaChannel, method: Basic.Deliver, _props: BasicProperties,
                            body: bytes) -> None:
        self._last_delivery = time.monotonic()
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            return
        metrics.count(metrics.MESSAGES_RECEIVED, self._label(envelope.service), envelope.kind)
        if not self._may_serve():
            # This MN can no longer prove it is alive: hand the message to someone who is.
            self._ch.publish(UNROUTABLE_EXCHANGE, method.routing_key, body)
            return
        self._spawn(self._handle(envelope))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start `coro` now (see eager.py); track it while it waits, so drain() can wait for it."""
        try:
            task = start_eagerly(coro)
        except Exception:
            log.exception("message handling failed")
            return
        if task is not None:
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _handle(self, envelope: Envelope) -> None:
        if envelope.expired():
            metrics.count(metrics.MESSAGES_REJECTED, self._label(envelope.service), "expired")
            return
        service = self._services.get(envelope.service)
        handler = service.handler(envelope.type) if service else None
        body, error = None, None
        if handler is None:
            error = {"code": "UnknownMessage",
                     "message": f"no handler for {envelope.type!r} in service {envelope.service!r}"}
            metrics.count(metrics.MESSAGES_REJECTED, self._label(envelope.service), "unknown_type")
        else:
            try:
                body = await handler(envelope)
            except ServiceError as exc:
                error = exc.as_dict()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("handler %s/%s failed", envelope.service, envelope.type)
                error = {"code": "InternalError", "message": f"{type(exc).__name__}: {exc}"}
        if envelope.reply_to and envelope.correlation:
            self._reply(envelope, body, error)

    def _reply(self, request: Envelope, body: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        reply = request.reply(self.self_uuid or "", body, error)
        try:
            self._ch.publish(P2P_EXCHANGE, request.reply_to, reply.encode())
            metrics.count(metrics.MESSAGES_SENT, self._label(request.service), "reply")
        except BrokerUnavailable:
            log.warning("could not reply to %s/%s: broker connection lost", request.service, request.type)

    def _on_reply(self, _ch: PikaChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            return
        pending = self._pending.get(envelope.correlation or "")
        if pending is not None and not pending.future.done():
            pending.future.set_result(envelope)

    def _on_event(self, _ch: PikaChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            return
        metrics.count(metrics.MESSAGES_RECEIVED, "event", "event")
        for pattern, callbacks in self._subscriptions.items():
            if _topic_matches(pattern, method.routing_key):
                for callback in callbacks:
                    result = callback(method.routing_key, envelope.body)
                    if asyncio.iscoroutine(result):
                        self._spawn(result)

    def _on_api(self, channel: PikaChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        self._last_delivery = time.monotonic()
        envelope = self._decode(body, API_QUEUE)
        if envelope is None:
            channel.basic_ack(method.delivery_tag)
            return
        metrics.count(metrics.MESSAGES_RECEIVED, API_SERVICE, "api")
        self._spawn(self._route_api(channel, method.delivery_tag, envelope))

    async def _route_api(self, channel: PikaChannel, tag: int, envelope: Envelope) -> None:
        """Take an API message: handle it here when this MN owns it, else forward it to the owner."""
        try:
            owner = self._owner(envelope)
            if owner == self.self_uuid:
                await self._handle(envelope)
            else:
                self._publish(service_queue(envelope.service, owner), envelope)
        finally:
            if channel.is_open:
                channel.basic_ack(tag)

    def _on_unroutable(self, channel: PikaChannel, method: Basic.Deliver, _props: BasicProperties,
                       body: bytes) -> None:
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            channel.basic_ack(method.delivery_tag)
            return
        self._spawn(self._reroute(channel, method.delivery_tag, method.routing_key, envelope))

    async def _reroute(self, channel: PikaChannel, tag: int, routing_key: str, envelope: Envelope) -> None:
        """Re-send a message whose target queue is gone, once the ring no longer names that MN."""
        try:
            target = _split_queue(routing_key)
            reason = self._unreroutable_reason(envelope, target)
            if reason is None:
                dead_mn = target[1]
                give_up = envelope.deadline or (time.time() + self.reroute_wait)
                while dead_mn in self._ring() and time.time() < give_up:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ring_changed.wait(), max(0.0, give_up - time.time()))
                if dead_mn in self._ring():
                    reason = "expired"
                else:
                    self._route_and_publish(envelope.hop())
                    metrics.count(metrics.REROUTES, self._label(envelope.service), "queue_gone")
                    return
            metrics.count(metrics.MESSAGES_REJECTED, self._label(envelope.service), reason)
            log.info("dropped %s/%s for %s: %s", envelope.service, envelope.type, routing_key, reason)
            if envelope.kind == "call" and envelope.reply_to and reason != "reply_to_gone":
                self._reply(envelope, None, {"code": "NoRoute", "message": f"message could not be delivered: {reason}"})
        except (BrokerUnavailable, NotServing) as exc:
            log.warning("could not re-route %s/%s: %s", envelope.service, envelope.type, exc)
        finally:
            if channel.is_open:
                channel.basic_ack(tag)

    def _unreroutable_reason(self, envelope: Envelope, target: tuple[str, str] | None) -> str | None:
        if envelope.kind == "reply":
            return "reply_to_gone"
        if target is None or envelope.resource is None:
            return "no_route"
        if envelope.hops >= MAX_HOPS:
            return "hop_limit"
        if envelope.expired():
            return "expired"
        return None

    def pending_calls(self) -> int:
        return len(self._pending)


def _new_id() -> str:
    return f"{random.getrandbits(128):032x}"


def _topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` is zero or more."""
    return _match(pattern.split("."), topic.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])
