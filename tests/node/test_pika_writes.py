"""The bus's one patch of pika internals (zstack_node.bus.pika_writes) against the installed pika and a real
broker: it must really apply, so that a pika release that renames what it needs fails here, loudly, instead of
silently making every bus call slower."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from zstack_node.bus import pika_writes
from zstack_node.bus.amqp import Connection

pytestmark = pytest.mark.timeout(60)


def test_batched_writes_apply_to_a_real_connection_and_messages_still_flow(rabbitmq) -> None:
    async def scenario() -> tuple[bool, list[bytes]]:
        conn = await Connection.open(rabbitmq.url, name="pika-writes-test")
        try:
            channel = await conn.channel()
            queue = f"zstack.test.pika-writes.{uuid.uuid4().hex}"
            received: asyncio.Queue[bytes] = asyncio.Queue()
            raw = channel.raw
            declared = asyncio.get_running_loop().create_future()
            raw.queue_declare(queue, exclusive=True, callback=lambda _frame: declared.set_result(None))
            await asyncio.wait_for(declared, 10)
            raw.basic_consume(queue, lambda _ch, _m, _p, body: received.put_nowait(body), auto_ack=True)
            bodies = [f"m{i}".encode() for i in range(50)]
            for body in bodies:  # a burst: the frames of all 50 share the batched flushes
                raw.basic_publish("", queue, body)
            got = [await asyncio.wait_for(received.get(), 10) for _ in bodies]
            return pika_writes.installed(conn.raw), got
        finally:
            await conn.close()

    installed, got = asyncio.run(scenario())
    assert installed, (
        f"pika {pika_writes.pika.__version__} changed the transport internals pika_writes needs "
        f"({', '.join(pika_writes._NEEDED)}): update node/zstack_node/bus/pika_writes.py or pin pika back")
    assert got == [f"m{i}".encode() for i in range(50)], "messages lost or reordered through the batched writes"
