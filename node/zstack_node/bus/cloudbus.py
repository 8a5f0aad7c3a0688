"""The cloud bus: routing by the ring, calls, events, and re-routing of messages to dead MNs.

Topology and names are in topology.py. The delivery guarantees:
- A point-to-point message goes to the queue of the resource owner's MN. If that queue no longer
  exists, the alternate exchange keeps the message in `zstack.message.unroutable`, and a serving MN
  re-sends it once its ring no longer holds the dead MN (hop limit 5, within the deadline).
- API messages are taken from the shared queue with manual acks. The taker forwards them to the
  owner with a publisher confirm, and acks only after the confirm, or after handling one it owns.
  If the taker dies first, the broker redelivers the message to another MN.
- A call pending on an MN that leaves the ring is re-sent to the new owner when its envelope says
  `idempotent=True` (reads, and operations keyed by a job id that the handler de-duplicates).
  Every other pending call fails at once with `TargetLeft`: its outcome is unknown.
- Nothing waits past its deadline: calls fail with `Timeout`, and undeliverable calls get a
  `NoRoute` reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pika import BasicProperties
from pika.channel import Channel as PikaChannel
from pika.spec import Basic

from zstack_kube.backoff import Backoff
from zstack_node import metrics
from zstack_node.bus.amqp import BrokerUnavailable, Channel, Connection
from zstack_node.bus.endpoint import Endpoint, ServiceError
from zstack_node.bus.envelope import MAX_HOPS, Envelope, MalformedMessage
from zstack_node.bus.topology import (
    API_QUEUE,
    API_SERVICE,
    DEAD_LETTER_EXCHANGE,
    EVENT_EXCHANGE,
    P2P_EXCHANGE,
    REPLY_SERVICE,
    UNROUTABLE_EXCHANGE,
    UNROUTABLE_QUEUE,
    declare_shared,
    event_queue,
    reply_queue,
    service_queue,
    split_queue,
    topic_matches,
)
from zstack_node.config import redact
from zstack_node.ring import Ring, RingChange

log = logging.getLogger(__name__)

_PERSISTENT = BasicProperties(delivery_mode=2)
_FIXED_LABELS = frozenset((API_SERVICE, "event", REPLY_SERVICE))
_PREFETCH = 64
_PAUSE_WAIT = 1.0  # seconds a pause waits for the broker to confirm each cancelled consumer
_HELD_POLL = 0.1  # seconds between checks whether a suspended MN serves again
_PROBE_TOPIC = "zstack.probe"  # bound by nobody: the broker confirms and drops it
_RETRY_LIVE_TARGET_AFTER = 1.0  # seconds: a live MN's queue may be missing only while it reconnects


class BusError(Exception):
    """A call did not produce a reply body. `code` is stable for programs."""

    code = "BusError"


class CallTimeout(BusError):
    code = "Timeout"


class TargetLeft(BusError):
    code = "TargetLeft"


class NotServing(BusError):
    code = "NotServing"


class BrokerDown(BusError):
    code = "BrokerUnavailable"


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
OnMessage = Callable[[PikaChannel, Basic.Deliver, BasicProperties, bytes], None]


def _guarded(*, manual_ack: bool) -> Callable[[Callable[..., None]], OnMessage]:
    """An exception escaping a pika callback would abort the whole connection: contain it.

    The message is dead-lettered with the error; on a manual-ack channel it is acked too.
    """

    def wrap(callback: Callable[..., None]) -> OnMessage:
        @functools.wraps(callback)
        def guarded(self: CloudBus, channel: PikaChannel, method: Basic.Deliver, props: BasicProperties,
                    body: bytes) -> None:
            try:
                callback(self, channel, method, props, body)
            except Exception as exc:
                log.exception("failed to take a message from %s", method.routing_key)
                self._dead_letter(body, method.routing_key, f"{type(exc).__name__}: {exc}")
                if manual_ack:
                    _settle(channel, method.delivery_tag)

        return guarded  # type: ignore[return-value]

    return wrap


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
        self._services: Mapping[str, Endpoint] = {}
        self._subscriptions: dict[str, list[EventCallback]] = {}
        self._conn: Connection | None = None
        self._ch: Channel | None = None  # auto-ack consumers and plain publishes
        self._api_ch: Channel | None = None  # manual acks: api.portal
        self._unroutable_ch: Channel | None = None  # manual acks: the unroutable queue
        self._confirm_ch: Channel | None = None  # confirmed publishes
        self._declared: tuple[Connection, str] | None = None  # own queues exist on this connection
        self._accepting = False  # consuming the shared API and unroutable queues
        self._shared_consumers: list[tuple[Channel, str]] = []
        self._setup_lock = asyncio.Lock()
        self._pending: dict[str, _PendingCall] = {}
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._ring_changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected_since: float | None = time.monotonic()
        self._stopping = False
        self._dropped_on_purpose = False
        self._supervisor: asyncio.Task[None] | None = None
        self._last_delivery = 0.0

    # ---- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def disconnected_for(self) -> float:
        """Seconds since the broker connection was lost; 0 while connected."""
        since = self._disconnected_since
        return 0.0 if since is None else time.monotonic() - since

    async def start(self) -> None:
        """Connect (retrying with back-off, logging what it waits for) and keep reconnecting."""
        self._supervisor = asyncio.create_task(self._supervise(), name="bus-supervisor")
        await self.wait_connected()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def _supervise(self) -> None:
        # Capped low: the MN is suspended until it is back, and a retry every ~2 s costs the broker nothing.
        backoff, attempt = Backoff(0.2, 2.0), 0
        while not self._stopping:
            try:
                conn = await Connection.open(self.url, name=f"zstack-node {self.self_uuid or ''}".strip())
                try:
                    async with self._setup_lock:
                        await self._setup(conn)
                except Exception:
                    with contextlib.suppress(Exception):
                        await conn.close()
                    raise
            except Exception as exc:  # noqa: BLE001 - every failure means: wait, then try again
                attempt += 1
                delay = backoff.next()
                log.warning("waiting for the broker at %s: %s (attempt %d, next try in %.1fs)",
                            redact(self.url), exc, attempt, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            if attempt:
                log.info("connected to the broker at %s after %d attempt(s)", redact(self.url), attempt + 1)
            backoff.reset()
            attempt = 0
            self._disconnected_since = None
            self._connected.set()
            reason = await conn.closed
            self._connected.clear()
            self._disconnected_since = time.monotonic()
            if self._stopping:
                return
            if self._dropped_on_purpose:
                self._dropped_on_purpose = False
                log.info("closed the broker connection to drop this MN's queues; reconnecting")
            else:
                log.warning("lost the broker connection (%s); reconnecting", reason)
            self._after_connection_loss()

    async def _setup(self, conn: Connection) -> None:
        """Declare the shared topology, then what this MN serves (own queues, shared work)."""
        self._conn = conn
        self._ch = await conn.channel()
        self._api_ch = await conn.channel()
        self._unroutable_ch = await conn.channel()
        self._confirm_ch = await conn.channel()
        await self._confirm_ch.enable_confirms()
        await self._api_ch.qos(_PREFETCH)
        await self._unroutable_ch.qos(_PREFETCH)
        await declare_shared(self._ch)
        if self.self_uuid:
            await self._declare_own_queues(self.self_uuid)
        if self._accepting:
            await self._consume_shared()

    async def _declare_own_queues(self, mn_uuid: str) -> None:
        if self._declared == (self._conn, mn_uuid):
            return
        ch = self._ch
        for name in self._services:
            queue = service_queue(name, mn_uuid)
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
        self._declared = (self._conn, mn_uuid)

    async def _consume_shared(self) -> None:
        self._shared_consumers = [
            (self._api_ch, await self._api_ch.consume(API_QUEUE, self._on_api, auto_ack=False)),
            (self._unroutable_ch, await self._unroutable_ch.consume(UNROUTABLE_QUEUE, self._on_unroutable,
                                                                    auto_ack=False)),
        ]

    def _after_connection_loss(self) -> None:
        """Replies may have been lost with the reply queue: repeat what is safe, fail the rest."""
        self._declared = None
        for corr, pending in list(self._pending.items()):
            if pending.envelope.idempotent:
                self._spawn(self._resend_when_connected(corr))
            else:
                self._fail(corr, BrokerDown("lost the broker connection while waiting for the reply"))

    async def _resend_when_connected(self, corr: str) -> None:
        await self._connected.wait()
        pending = self._pending.get(corr)
        if pending is not None:
            try:
                self._route_and_publish(pending.envelope, pending)
            except BusError as exc:
                self._fail(corr, exc)

    # ---- serving -----------------------------------------------------------------------------

    async def serve(self, mn_uuid: str, services: Mapping[str, Endpoint]) -> None:
        """Become `mn_uuid`: declare its service, reply and event queues and consume them."""
        await self.wait_connected()
        async with self._setup_lock:
            self.self_uuid = mn_uuid
            self._services = services
            await self._declare_own_queues(mn_uuid)

    async def accept_shared_work(self) -> None:
        """Start taking API and unroutable messages: only once this MN is running with a ring."""
        async with self._setup_lock:
            if not self._accepting:
                self._accepting = True
                if self.connected:
                    await self._consume_shared()

    async def pause(self) -> None:
        """Stop taking API and unroutable messages (the MN suspended); `accept_shared_work` resumes.
        What is queued stays in the broker for the MNs that serve.

        Each cancel waits at most a second for the broker: in a partition it never answers, and the MN
        must go on checking whether it was evicted. A message delivered meanwhile is given back."""
        async with self._setup_lock:
            self._accepting = False
            consumers, self._shared_consumers = self._shared_consumers, []
            if self.connected:
                for channel, tag in consumers:
                    with contextlib.suppress(BrokerUnavailable, TimeoutError):
                        await asyncio.wait_for(channel.cancel(tag), _PAUSE_WAIT)

    async def drain(self, grace: float) -> None:
        """Stop taking new work and let the work in flight finish (graceful leave, steps 1-2).

        Unbinding the service queues makes new messages for this MN unroutable, so other MNs
        re-route them once their rings drop it; what is already queued here is still served.
        """
        if not (self.self_uuid and self.connected):
            return
        self._accepting = False
        try:
            for channel, tag in self._shared_consumers:
                await channel.cancel(tag)
            for name in self._services:
                queue = service_queue(name, self.self_uuid)
                await self._ch.unbind(queue, P2P_EXCHANGE, queue)
        except BrokerUnavailable:
            return
        # Messages held for re-routing would wait for this very MN to leave: give them back.
        for task in [t for t in self._in_flight if t.get_name() == "reroute"]:
            task.cancel()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if time.monotonic() - self._last_delivery > 0.05 and not self._in_flight:
                return
            await asyncio.sleep(0.01)
        log.warning("%d handler(s) still running after the %.1fs grace period", len(self._in_flight), grace)

    async def stop_serving(self, reason: str) -> None:
        """Drop this MN's identity at once (fencing).

        The connection closes first, so the broker requeues every message this MN had taken but
        not acked; only then are the handlers cancelled. Pending calls fail.
        """
        self.self_uuid = None
        self._accepting = False
        if self._conn is not None and self._conn.is_open:
            self._dropped_on_purpose = True
            with contextlib.suppress(Exception):
                await self._conn.close()  # the supervisor reconnects with the shared topology only
        for corr in list(self._pending):
            self._fail(corr, NotServing(f"this MN stopped serving ({reason})"))
        for task in list(self._in_flight):
            task.cancel()

    async def close(self) -> None:
        self._stopping = True
        for corr in list(self._pending):
            self._fail(corr, NotServing("the bus is closing"))
        if self._conn is not None and self._conn.is_open:
            with contextlib.suppress(Exception):
                await self._conn.close()
        if self._supervisor is not None:
            self._supervisor.cancel()

    # ---- sending ---------------------------------------------------------------------------

    def _owner(self, envelope: Envelope) -> str:
        """The MN that must handle `envelope`: the ring owner of its resource, else this MN."""
        if envelope.resource is None:
            return self._require_self()
        ring = self._ring()
        if not ring.members:
            raise NotServing("this MN has no ring: it is not serving")
        return ring.owner(envelope.resource)

    def _require_self(self) -> str:
        if self.self_uuid is None:
            raise NotServing("this MN is not serving: it has no identity on the bus")
        return self.self_uuid

    def _publish(self, queue: str, envelope: Envelope) -> None:
        if self._ch is None or not self.connected:
            raise BrokerDown("not connected to the broker")
        try:
            self._ch.publish(P2P_EXCHANGE, queue, envelope.encode())
        except BrokerUnavailable as exc:
            raise BrokerDown(str(exc)) from None
        metrics.count(metrics.MESSAGES_SENT, self._label(envelope.service), envelope.kind)

    async def _publish_confirmed(self, queue: str, envelope: Envelope) -> None:
        """Publish persistently; return once the broker has routed it (to a queue or the AE)."""
        if self._confirm_ch is None or not self.connected:
            raise BrokerDown("not connected to the broker")
        try:
            confirm = self._confirm_ch.publish_confirmed(P2P_EXCHANGE, queue, envelope.encode(), _PERSISTENT)
            await asyncio.wait_for(confirm, self.call_timeout)
        except BrokerUnavailable as exc:
            raise BrokerDown(str(exc)) from None
        except TimeoutError:
            raise BrokerDown(f"the broker did not confirm within {self.call_timeout:g}s") from None
        metrics.count(metrics.MESSAGES_SENT, self._label(envelope.service), envelope.kind)

    async def probe(self, timeout: float) -> bool:
        """Whether the broker answers on this connection now: a publish it confirms within `timeout`.

        A connection can look open while the network drops every byte (a partition): only a round trip
        proves this MN can still send and receive. Nothing is routed: no queue binds the probe's topic."""
        if self._confirm_ch is None or not self.connected:
            return False
        try:
            confirm = self._confirm_ch.publish_confirmed(EVENT_EXCHANGE, _PROBE_TOPIC, b"")
            await asyncio.wait_for(confirm, timeout)
        except (BrokerUnavailable, TimeoutError):
            return False
        return True

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
        metrics.child(metrics.CALL_SECONDS, self._label(service)).observe(time.perf_counter() - pending.started)
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
        envelope = Envelope(message_type, service, "api", body, resource, sender=self.self_uuid)
        await self._publish_confirmed(API_QUEUE, envelope)

    def publish_event(self, topic: str, body: dict[str, Any]) -> None:
        if self._ch is None or not self.connected:
            raise BrokerDown("not connected to the broker")
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
                except BusError as exc:
                    self._fail(corr, exc)
            else:
                self._fail(corr, TargetLeft(
                    f"MN {pending.target} left the ring while handling {pending.envelope.service}/"
                    f"{pending.envelope.type}: the outcome is unknown, and the call is not marked "
                    "idempotent, so it was not repeated"))

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

    def _dead_letter(self, body: bytes, source: str, reason: str, *, kind: str = "malformed") -> None:
        log.warning("dead-lettered a message from %s: %s", source, reason)
        service = (split_queue(source) or (source, ""))[0]
        metrics.count(metrics.MESSAGES_REJECTED, self._label(service), kind)
        if self._ch is not None and self._ch.is_open:
            headers = {"x-zstack-reason": reason, "x-zstack-source": source}
            self._ch.publish(DEAD_LETTER_EXCHANGE, "", body, BasicProperties(headers=headers))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str = "handle") -> None:
        """Run `coro` as a task tracked until it ends, so drain() can wait for it."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    @_guarded(manual_ack=False)
    def _on_service_message(self, _ch: PikaChannel, method: Basic.Deliver, _props: BasicProperties,
                            body: bytes) -> None:
        self._last_delivery = time.monotonic()
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            return
        metrics.count(metrics.MESSAGES_RECEIVED, self._label(envelope.service), envelope.kind)
        if not self._may_serve():
            if envelope.resource is None:  # meant for this very MN: nobody else may take it
                self._spawn(self._handle_when_serving(envelope, method.routing_key), name="held")
                return
            # This MN can no longer prove it is alive: hand the message to someone who is.
            self._ch.publish(UNROUTABLE_EXCHANGE, method.routing_key, body)
            return
        owner = self._owner_or_none(envelope)
        if owner is not None and owner != self.self_uuid and envelope.hops < MAX_HOPS:
            # The sender's ring is older or newer than ours: pass it on, one hop further.
            self._publish(service_queue(envelope.service, owner), envelope.hop())
            metrics.count(metrics.REROUTES, self._label(envelope.service), "not_owner")
            return
        self._spawn(self._handle(envelope))

    async def _handle_when_serving(self, envelope: Envelope, routing_key: str) -> None:
        """Hold a message without a resource while this MN is suspended: handle it once it serves again
        under the same UUID; answer NoRoute if it fences, or if the message's deadline passes first."""
        me = self.self_uuid
        give_up = envelope.deadline or (time.time() + self.reroute_wait)
        while not self._may_serve():
            if self.self_uuid != me or time.time() >= give_up:
                self._drop(envelope, routing_key, "expired" if self.self_uuid == me else "no_route")
                return
            await asyncio.sleep(_HELD_POLL)
        await self._handle(envelope)

    def _owner_or_none(self, envelope: Envelope) -> str | None:
        ring = self._ring()
        return ring.owner(envelope.resource) if envelope.resource and ring.members else None

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

    @_guarded(manual_ack=False)
    def _on_reply(self, _ch: PikaChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            return
        pending = self._pending.get(envelope.correlation or "")
        if pending is not None and not pending.future.done():
            pending.future.set_result(envelope)

    @_guarded(manual_ack=False)
    def _on_event(self, _ch: PikaChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            return
        metrics.count(metrics.MESSAGES_RECEIVED, "event", "event")
        for pattern, callbacks in self._subscriptions.items():
            if topic_matches(pattern, method.routing_key):
                for callback in callbacks:
                    try:
                        result = callback(method.routing_key, envelope.body)
                    except Exception:
                        log.exception("event subscriber for %s failed", method.routing_key)
                        continue
                    if asyncio.iscoroutine(result):
                        self._spawn(result, name="event")

    @_guarded(manual_ack=True)
    def _on_api(self, channel: PikaChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        self._last_delivery = time.monotonic()
        envelope = self._decode(body, API_QUEUE)
        if envelope is None:
            channel.basic_ack(method.delivery_tag)
            return
        metrics.count(metrics.MESSAGES_RECEIVED, API_SERVICE, "api")
        self._spawn(self._route_api(channel, method.delivery_tag, envelope))

    async def _route_api(self, channel: PikaChannel, tag: int, envelope: Envelope) -> None:
        """Handle an API message this MN owns, or forward it with a confirm; ack only after that."""
        with _given_back_if_cancelled(channel, tag):
            await self._take_api(channel, tag, envelope)

    async def _take_api(self, channel: PikaChannel, tag: int, envelope: Envelope) -> None:
        if not self._may_serve():  # delivered just before this MN suspended: for an MN that serves
            _settle(channel, tag, requeue=True)
            return
        try:
            owner = self._owner(envelope)
            if owner == self.self_uuid:
                await self._handle(envelope)
            else:
                await self._publish_confirmed(service_queue(envelope.service, owner), envelope)
        except BusError as exc:
            log.warning("could not route API %s/%s (%s); giving it back", envelope.service, envelope.type, exc)
            await asyncio.sleep(0.2)  # do not spin if every MN is in the same state
            _settle(channel, tag, requeue=True)
            return
        _settle(channel, tag)

    @_guarded(manual_ack=True)
    def _on_unroutable(self, channel: PikaChannel, method: Basic.Deliver, _props: BasicProperties,
                       body: bytes) -> None:
        envelope = self._decode(body, method.routing_key)
        if envelope is None:
            channel.basic_ack(method.delivery_tag)
            return
        self._spawn(self._reroute(channel, method.delivery_tag, method.routing_key, envelope), name="reroute")

    async def _reroute(self, channel: PikaChannel, tag: int, routing_key: str, envelope: Envelope) -> None:
        with _given_back_if_cancelled(channel, tag):
            await self._try_reroute(channel, tag, routing_key, envelope)

    async def _try_reroute(self, channel: PikaChannel, tag: int, routing_key: str, envelope: Envelope) -> None:
        """Re-send a message whose target queue is gone, once the ring no longer names that MN.

        While the target MN is still in the ring (its queue may be missing only while it
        reconnects), the message goes back to that queue after a second.
        """
        target = split_queue(routing_key)
        reason = self._unreroutable_reason(envelope, target)
        if reason is None:
            dead_mn = target[1]
            give_up = envelope.deadline or (time.time() + self.reroute_wait)
            retry_at = time.monotonic() + _RETRY_LIVE_TARGET_AFTER
            while dead_mn in self._ring() and time.time() < give_up and time.monotonic() < retry_at:
                with contextlib.suppress(TimeoutError):
                    wait = min(give_up - time.time(), retry_at - time.monotonic())
                    await asyncio.wait_for(self._ring_changed.wait(), max(0.0, wait))
            if not channel.is_open:
                return  # the broker gives the message to another MN
            if time.time() >= give_up:
                reason = "expired"
            else:
                try:
                    owner = self._owner(envelope)
                    # Back to a target still in the ring is a retry, bounded by the deadline it
                    # now carries; only a move to another MN counts against the hop limit.
                    again = replace(envelope, deadline=give_up) if owner == dead_mn else envelope.hop()
                    await self._publish_confirmed(service_queue(envelope.service, owner), again)
                except BusError as exc:
                    log.warning("could not re-route %s/%s (%s); giving it back", envelope.service, envelope.type,
                                exc)
                    await asyncio.sleep(0.2)
                    _settle(channel, tag, requeue=True)
                    return
                metrics.count(metrics.REROUTES, self._label(envelope.service), "queue_gone")
                _settle(channel, tag)
                return
        self._drop(envelope, routing_key, reason)
        _settle(channel, tag)

    def _unreroutable_reason(self, envelope: Envelope, target: tuple[str, str] | None) -> str | None:
        if envelope.kind == "reply":
            return "reply_to_gone"
        if target is None or envelope.resource is None or envelope.service not in self._services:
            return "no_route"
        if envelope.hops >= MAX_HOPS:
            return "hop_limit"
        if envelope.expired():
            return "expired"
        return None

    def _drop(self, envelope: Envelope, routing_key: str, reason: str) -> None:
        """Give up on a message: a call gets a NoRoute reply, anything else is dead-lettered."""
        if reason == "reply_to_gone":  # its caller is gone: nobody waits for it
            metrics.count(metrics.MESSAGES_REJECTED, self._label(envelope.service), reason)
            return
        if envelope.kind == "call" and envelope.reply_to:
            metrics.count(metrics.MESSAGES_REJECTED, self._label(envelope.service), reason)
            self._reply(envelope, None, {"code": "NoRoute", "message": f"could not deliver: {reason}"})
        else:
            self._dead_letter(envelope.encode(), routing_key, f"undeliverable: {reason}", kind=reason)


def _settle(channel: PikaChannel, tag: int, *, requeue: bool | None = None) -> None:
    """Ack a manually acked delivery, or give it back; a closed channel already gave it back."""
    if not channel.is_open:
        return
    if requeue:
        channel.basic_nack(tag, requeue=True)
    else:
        channel.basic_ack(tag)


@contextlib.contextmanager
def _given_back_if_cancelled(channel: PikaChannel, tag: int) -> Iterator[None]:
    """A handler cancelled before it settled its delivery gives the message back to the queue."""
    try:
        yield
    except asyncio.CancelledError:
        _settle(channel, tag, requeue=True)
        raise


def _new_id() -> str:
    return f"{random.getrandbits(128):032x}"
