"""The server side of `zstack-bench bus`, each run as its own process.

    python -m zstack_bench.bus_peers raw --url URL --echo-queue Q --sink-queue S --count N
    python -m zstack_bench.bus_peers cloudbus --url URL --server-uuid S --client-uuid C [--no-pika-writes]

Each prints `ready` on stdout once it consumes, and exits when its stdin closes, so a peer
never outlives the benchmark that started it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from typing import Any

import click
import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from zstack_node.bus import pika_writes
from zstack_node.bus.cloudbus import CloudBus
from zstack_node.bus.envelope import Envelope
from zstack_node.ring import Ring
from zstack_node.service import Service, handles

BENCH_SERVICE = "benchecho"
DONE = b"done"


def _exit_when_stdin_closes() -> None:
    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


@click.group()
def main() -> None:
    """Benchmark peers."""


@main.command()
@click.option("--url", required=True)
@click.option("--echo-queue", required=True)
@click.option("--sink-queue", required=True)
@click.option("--count", type=int, required=True, help="Sink messages per round; then `done` to reply_to")
def raw(url: str, echo_queue: str, sink_queue: str, count: int) -> None:
    """Raw pika: echo request/reply on one queue, count one-way messages on another."""
    _exit_when_stdin_closes()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(echo_queue, exclusive=True)
    ch.queue_declare(sink_queue, exclusive=True)
    seen = 0

    def on_echo(channel: BlockingChannel, _m: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        channel.basic_publish("", props.reply_to, body, BasicProperties(correlation_id=props.correlation_id))

    def on_sink(channel: BlockingChannel, _m: Basic.Deliver, props: BasicProperties, _body: bytes) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            seen = 0
            channel.basic_publish("", props.reply_to, DONE, BasicProperties(correlation_id="done"))

    ch.basic_consume(echo_queue, on_echo, auto_ack=True)
    ch.basic_consume(sink_queue, on_sink, auto_ack=True)
    _ready()
    ch.start_consuming()


class EchoService(Service):
    """Echo for calls; Sink counts one-way messages, and Count returns and resets the count."""

    name = BENCH_SERVICE
    sunk = 0

    @handles("Echo")
    async def echo(self, msg: Envelope) -> dict[str, Any]:
        return msg.body

    @handles("Sink")
    async def sink(self, _msg: Envelope) -> None:
        self.sunk += 1

    @handles("Count")
    async def count(self, _msg: Envelope) -> dict[str, Any]:
        sunk, self.sunk = self.sunk, 0
        return {"count": sunk}


def without_pika_writes() -> None:
    """Keep pika's own write path in this process (the bus's batched writes off), for a with/without figure."""
    pika_writes.install = lambda _connection: None


def bench_ring(server_uuid: str, client_uuid: str) -> Ring:
    """The fixed two-member ring both sides of the CloudBus benchmark route by."""
    return Ring.of((server_uuid, client_uuid))


async def _serve_cloudbus(url: str, server_uuid: str, client_uuid: str) -> None:
    ring = bench_ring(server_uuid, client_uuid)
    bus = CloudBus(url, ring=lambda: ring, may_serve=lambda: True)
    await bus.start()
    await bus.serve(server_uuid, {BENCH_SERVICE: EchoService(None)})  # type: ignore[arg-type]  # uses no context
    _ready()
    await asyncio.Event().wait()


@main.command()
@click.option("--url", required=True)
@click.option("--server-uuid", required=True)
@click.option("--client-uuid", required=True)
@click.option("--pika-writes/--no-pika-writes", default=True, help="The bus's batched socket writes")
def cloudbus(url: str, server_uuid: str, client_uuid: str, pika_writes: bool) -> None:
    """Our CloudBus hosting EchoService as `server_uuid` in the ring {server, client}."""
    _exit_when_stdin_closes()
    if not pika_writes:
        without_pika_writes()
    asyncio.run(_serve_cloudbus(url, server_uuid, client_uuid))


if __name__ == "__main__":
    main()
