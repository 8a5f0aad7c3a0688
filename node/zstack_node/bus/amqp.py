"""A thin asyncio face over pika's AsyncioConnection: awaitable opens, declares and confirms.

pika's asyncio adapter is callback-style. This module turns each callback into a future, and
fails every pending future when the channel or connection closes, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel as PikaChannel
from pika.spec import Basic, BasicProperties

from zstack_node.bus import pika_writes

log = logging.getLogger(__name__)


OnMessage = Callable[[PikaChannel, Basic.Deliver, BasicProperties, bytes], None]


class BrokerUnavailable(ConnectionError):
    """The broker connection or channel is gone; the caller may retry after reconnecting."""


class Channel:
    """One AMQP channel with awaitable operations."""

    def __init__(self, channel: PikaChannel) -> None:
        self.raw = channel
        self._pending: set[asyncio.Future[Any]] = set()
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self._next_tag = 0
        self.closed = asyncio.get_running_loop().create_future()
        channel.add_on_close_callback(self._on_close)

    def _on_close(self, _channel: PikaChannel, reason: BaseException) -> None:
        error = BrokerUnavailable(f"channel closed: {reason}")
        for fut in [*self._pending, *self._confirms.values()]:
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        self._confirms.clear()
        if not self.closed.done():
            self.closed.set_result(reason)

    @property
    def is_open(self) -> bool:
        return self.raw.is_open

    def _await(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if not self.raw.is_open:
            raise BrokerUnavailable("channel is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(fut)

        def done(frame: Any) -> None:
            self._pending.discard(fut)
            if not fut.done():
                fut.set_result(frame)

        operation(*args, callback=done, **kwargs)
        return fut

    async def exchange(self, name: str, kind: str, *, durable: bool = True, arguments: dict | None = None) -> None:
        await self._await(self.raw.exchange_declare, name, kind, durable=durable, arguments=arguments)

    async def queue(self, name: str, *, durable: bool = False, exclusive: bool = False,
                    auto_delete: bool = False, arguments: dict | None = None) -> None:
        await self._await(self.raw.queue_declare, name, durable=durable, exclusive=exclusive,
                          auto_delete=auto_delete, arguments=arguments)

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._await(self.raw.queue_bind, queue, exchange, routing_key=routing_key)

    async def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._await(self.raw.queue_unbind, queue, exchange, routing_key=routing_key)

    async def qos(self, prefetch: int) -> None:
        await self._await(self.raw.basic_qos, prefetch_count=prefetch)

    async def consume(self, queue: str, on_message: OnMessage, *, auto_ack: bool) -> str:
        tag = f"ctag-{queue}"
        await self._await(self.raw.basic_consume, queue, on_message, auto_ack=auto_ack, consumer_tag=tag)
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        await self._await(self.raw.basic_cancel, consumer_tag)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: BasicProperties | None = None) -> None:
        """Fire and forget: pika buffers the frame and the event loop writes it."""
        if not self.raw.is_open:
            raise BrokerUnavailable("channel is not open")
        self.raw.basic_publish(exchange, routing_key, body, properties)

    async def enable_confirms(self) -> None:
        await self._await(self.raw.confirm_delivery, self._on_confirm)

    def publish_confirmed(self, exchange: str, routing_key: str, body: bytes,
                          properties: BasicProperties | None = None) -> asyncio.Future[None]:
        """Publish and return a future that resolves when the broker confirms it.

        Many publishes may be in flight at once; the broker acks them in batches (`multiple`),
        so confirms cost no round trip per message.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.publish(exchange, routing_key, body, properties)
        self._next_tag += 1
        self._confirms[self._next_tag] = fut
        return fut

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tags = [t for t in self._confirms if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            fut = self._confirms.pop(tag, None)
            if fut is None or fut.done():
                continue
            if acked:
                fut.set_result(None)
            else:
                fut.set_exception(BrokerUnavailable(f"broker refused message (nack, tag {tag})"))


class Connection:
    """One AMQP connection opened on the running event loop."""

    def __init__(self, raw: AsyncioConnection) -> None:
        self.raw = raw
        self.closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, *, name: str = "zstack") -> Connection:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        params = pika.URLParameters(url)
        params.client_properties = {"connection_name": name}
        if "heartbeat=" not in url:  # the broker's 60 s default notices a dead peer far too late
            params.heartbeat = 10
        if "blocked_connection_timeout=" not in url:  # a broker blocking publishers (disk or memory alarm)
            params.blocked_connection_timeout = 30
        holder: list[Connection] = []

        def on_open(_conn: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_conn: Any, exc: BaseException) -> None:
            if not opened.done():
                opened.set_exception(BrokerUnavailable(f"cannot connect: {exc}"))

        def on_close(_conn: Any, reason: BaseException) -> None:
            if holder and not holder[0].closed.done():
                holder[0].closed.set_result(reason)

        raw = AsyncioConnection(params, on_open, on_open_error, on_close, custom_ioloop=loop)
        conn = cls(raw)
        holder.append(conn)
        await opened
        pika_writes.install(raw)
        return conn

    async def channel(self) -> Channel:
        fut: asyncio.Future[PikaChannel] = asyncio.get_running_loop().create_future()

        def on_open(channel: PikaChannel) -> None:
            if not fut.done():
                fut.set_result(channel)

        self.raw.channel(on_open_callback=on_open)
        done, _ = await asyncio.wait({fut, self.closed}, return_when=asyncio.FIRST_COMPLETED)
        if fut not in done:
            raise BrokerUnavailable("connection closed while opening a channel")
        return Channel(fut.result())

    async def close(self) -> None:
        if self.raw.is_open:
            self.raw.close()
        if not self.raw.is_closed:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout=5)

    @property
    def is_open(self) -> bool:
        return self.raw.is_open
