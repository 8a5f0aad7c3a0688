"""A bus client for tests: publishes envelopes with plain pika and waits for the replies."""

from __future__ import annotations

import time
import uuid

import pika

from zstack_node.bus.envelope import Envelope
from zstack_node.bus.topology import (
    API_QUEUE,
    DEAD_LETTER_QUEUE,
    P2P_EXCHANGE,
    UNROUTABLE_EXCHANGE,
    reply_queue,
    service_queue,
)


class BusProbe:
    """Plays a caller outside every MN: its own reply queue, raw publishes, raw reads."""

    def __init__(self, broker_url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        self.uuid = uuid.uuid4().hex
        self.replies = reply_queue(self.uuid)
        # The probe may connect before any MN has declared the shared topology: declare it the same way.
        self.channel.exchange_declare(UNROUTABLE_EXCHANGE, "fanout", durable=True)
        self.channel.exchange_declare(P2P_EXCHANGE, "direct", durable=True,
                                      arguments={"alternate-exchange": UNROUTABLE_EXCHANGE})
        self.channel.queue_declare(DEAD_LETTER_QUEUE, durable=True)
        self.channel.queue_declare(self.replies, exclusive=True)
        self.channel.queue_bind(self.replies, P2P_EXCHANGE, self.replies)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def call(self, queue: str, message_type: str, body: dict | None = None, *, resource: str | None = None,
             kind: str = "call", timeout: float = 10.0, idempotent: bool = False) -> Envelope:
        """Publish a call to `queue` and return its reply envelope."""
        self.publish_call(queue, message_type, body, resource=resource, kind=kind, timeout=timeout,
                          idempotent=idempotent)
        return self.wait_reply(timeout)

    def publish_call(self, queue: str, message_type: str, body: dict | None = None, *, resource: str | None = None,
                     kind: str = "call", timeout: float = 10.0, idempotent: bool = False) -> None:
        self.correlation = uuid.uuid4().hex
        envelope = Envelope(message_type, "demo", kind, body or {}, resource, correlation=self.correlation,
                            reply_to=self.replies, deadline=time.time() + timeout, sender=self.uuid,
                            idempotent=idempotent)
        self.channel.basic_publish(P2P_EXCHANGE, queue, envelope.encode())

    def wait_reply(self, timeout: float = 10.0) -> Envelope:
        """The reply to the last published call."""
        correlation = self.correlation
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _props, raw = self.channel.basic_get(self.replies, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.01)
                continue
            reply = Envelope.decode(raw)
            if reply.correlation == correlation:
                return reply
        raise TimeoutError(f"no reply to call {correlation} within {timeout}s")

    def call_mn(self, mn_uuid: str, message_type: str, body: dict | None = None, **kwargs) -> Envelope:
        return self.call(service_queue("demo", mn_uuid), message_type, body, **kwargs)

    def call_api(self, message_type: str, body: dict | None = None, **kwargs) -> Envelope:
        return self.call(API_QUEUE, message_type, body, kind="api", **kwargs)

    def publish_api_persistent(self, message_type: str, body: dict, *, resource: str) -> None:
        """A one-way API message, persistent and confirmed by the broker: what an MN's send_api does."""
        envelope = Envelope(message_type, "demo", "api", body, resource, sender=self.uuid)
        channel = self.connection.channel()
        channel.confirm_delivery()  # basic_publish now returns once the broker took it, or raises
        channel.basic_publish(P2P_EXCHANGE, API_QUEUE, envelope.encode(), pika.BasicProperties(delivery_mode=2))
        channel.close()

    def publish_raw(self, queue: str, body: bytes) -> None:
        self.channel.basic_publish(P2P_EXCHANGE, queue, body)

    def dead_letters(self) -> list[tuple[bytes, dict]]:
        """Drain the dead-letter queue: (body, headers) pairs."""
        found = []
        while True:
            method, props, raw = self.channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                return found
            found.append((raw, props.headers or {}))
