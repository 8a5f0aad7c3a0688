"""`zstack-bench bus`: our CloudBus against raw pika on the same broker in the same run.

Request/reply: a raw pika RPC (BlockingConnection, reply_to + correlation_id) against
CloudBus.call to the owner of a resource; each server is a separate process. One-way: raw pika
publish + consume counted to N against CloudBus.send routed to the owner, closed by a call
(the queue is FIFO, so its reply means every message before it was handled). The two sides
alternate in rounds so that drift on a shared machine hits both alike.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pika
from pika.spec import Basic, BasicProperties

from zstack_bench.bus_peers import BENCH_SERVICE, DONE, bench_ring, without_pika_writes
from zstack_bench.peers import cpu_seconds, peer
from zstack_bench.ring import random_uuid
from zstack_bench.stats import latency_summary, percentile
from zstack_node.bus.cloudbus import CloudBus
from zstack_node.ring import Ring

CALL_P50_TARGET = 1.5  # CloudBus call p50 at most 1.5x raw pika's
ONEWAY_TARGET = 0.5  # CloudBus one-way rate at least half raw pika's
LOOKUP_TARGET = 0.01  # a ring lookup at most 1% of a bus call p50
PAYLOAD = {"note": "x" * 64}


class RawClient:
    """Raw pika RPC and one-way publishing on one BlockingConnection."""

    def __init__(self, url: str, echo_queue: str, sink_queue: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.echo_queue, self.sink_queue = echo_queue, sink_queue
        self.reply_queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        self._waiting: str | None = None
        self._got: bytes | None = None
        self._next = 0

    def _on_reply(self, _ch: Any, _m: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        if props.correlation_id == self._waiting:
            self._got = body

    def _wait(self, correlation: str, timeout: float) -> bytes:
        self._waiting, self._got = correlation, None
        deadline = time.monotonic() + timeout
        while self._got is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw pika: no reply {correlation!r} within {timeout:g}s")
            self.conn.process_data_events(time_limit=1)
        return self._got

    def call(self, body: bytes, timeout: float = 10.0) -> bytes:
        self._next += 1
        corr = str(self._next)
        props = BasicProperties(reply_to=self.reply_queue, correlation_id=corr)
        self.ch.basic_publish("", self.echo_queue, body, props)
        return self._wait(corr, timeout)

    def oneway(self, count: int, body: bytes, timeout: float = 120.0) -> None:
        """Publish `count` messages; return once the sink has consumed all of them."""
        props = BasicProperties(reply_to=self.reply_queue)
        publish = self.ch.basic_publish
        for _ in range(count):
            publish("", self.sink_queue, body, props)
        if self._wait("done", timeout) != DONE:
            raise RuntimeError("raw pika sink answered something other than done")

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


class BusClient:
    """A CloudBus member of the two-MN ring, driven from a private event loop between rounds."""

    def __init__(self, url: str, client_uuid: str, server_uuid: str) -> None:
        self.loop = asyncio.new_event_loop()
        ring = bench_ring(server_uuid, client_uuid)
        self.bus = CloudBus(url, ring=lambda: ring, may_serve=lambda: True)
        self.resource = _owned_by(ring, server_uuid)
        self.loop.run_until_complete(self.bus.start())
        self.loop.run_until_complete(self.bus.serve(client_uuid, {}))

    def calls(self, count: int) -> list[float]:
        return self.loop.run_until_complete(self._calls(count))

    async def _calls(self, count: int) -> list[float]:
        call, resource, samples = self.bus.call, self.resource, []
        for _ in range(count):
            start = time.perf_counter()
            await call(BENCH_SERVICE, "Echo", PAYLOAD, resource=resource)
            samples.append(time.perf_counter() - start)
        return samples

    def oneway(self, count: int) -> None:
        self.loop.run_until_complete(self._oneway(count))

    async def _oneway(self, count: int) -> None:
        send, resource = self.bus.send, self.resource
        for i in range(count):
            send(BENCH_SERVICE, "Sink", PAYLOAD, resource=resource)
            if i % 256 == 255:
                await asyncio.sleep(0)  # let the loop write what pika buffered
        reply = await self.bus.call(BENCH_SERVICE, "Count", resource=resource, timeout=120)
        if reply.get("count") != count:
            raise RuntimeError(f"CloudBus sink counted {reply.get('count')} of {count} messages")

    def close(self) -> None:
        self.loop.run_until_complete(self.bus.close())
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()


def _owned_by(ring: Ring, mn: str) -> str:
    """A random resource UUID that `mn` owns in `ring`."""
    while True:
        resource = uuid.uuid4().hex
        if ring.owner(resource) == mn:
            return resource


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


class CpuMeter:
    """CPU seconds used by this process (the clients) and by one server process, summed over batches."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.client = self.server = 0.0

    def __enter__(self) -> CpuMeter:
        self._client0, self._server0 = time.process_time(), cpu_seconds(self.server_pid)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client += time.process_time() - self._client0
        self.server += cpu_seconds(self.server_pid) - self._server0

    def per_call_us(self, calls: int) -> dict[str, float]:
        return {"client": round(self.client / calls * 1e6, 1), "server": round(self.server / calls * 1e6, 1)}


def ring_lookup_us(mns: int = 10, keys: int = 20_000) -> float:
    """Mean cost of one lookup in a ring of `mns` MNs with the default vnodes, in microseconds."""
    import random

    rng = random.Random(7)
    ring = Ring.of(random_uuid(rng) for _ in range(mns))
    resources = [random_uuid(rng) for _ in range(keys)]
    owner = ring.owner
    owner(resources[0])
    start = time.perf_counter()
    for resource in resources:
        owner(resource)
    return (time.perf_counter() - start) / keys * 1e6


def run(url: str, calls: int = 5000, messages: int = 50_000, rounds: int = 5, warmup: int = 200,
        progress: Callable[[str], None] | None = None, pika_writes: bool = True) -> dict[str, Any]:
    """The benchmark's JSON object. `calls` and `messages` are per side, over all rounds.
    `pika_writes=False` measures the bus without its batched socket writes (zstack_node.bus.pika_writes)."""
    say = progress or (lambda _m: None)
    if not pika_writes:
        without_pika_writes()
    tag = uuid.uuid4().hex[:12]
    echo_q, sink_q = f"zstack.bench.echo.{tag}", f"zstack.bench.sink.{tag}"
    server_uuid, client_uuid = uuid.uuid4().hex, uuid.uuid4().hex
    per_round_calls, per_round_msgs = max(1, calls // rounds), max(1, messages // rounds)
    raw_body = json.dumps(PAYLOAD).encode()
    raw_lat: list[float] = []
    bus_lat: list[float] = []
    raw_time = bus_time = 0.0
    oneway_ratios: list[float] = []
    with ExitStack() as stack:
        say("bus: starting the raw pika and CloudBus server processes")
        raw_peer = stack.enter_context(peer("zstack_bench.bus_peers", [
            "raw", "--url", url, "--echo-queue", echo_q, "--sink-queue", sink_q, "--count", str(per_round_msgs)]))
        bus_peer = stack.enter_context(peer("zstack_bench.bus_peers", [
            "cloudbus", "--url", url, "--server-uuid", server_uuid, "--client-uuid", client_uuid,
            "--pika-writes" if pika_writes else "--no-pika-writes"]))
        raw_cpu, bus_cpu = CpuMeter(raw_peer.pid), CpuMeter(bus_peer.pid)
        raw = RawClient(url, echo_q, sink_q)
        stack.callback(raw.close)
        bus = BusClient(url, client_uuid, server_uuid)
        stack.callback(bus.close)

        say(f"bus: warm-up, {warmup} calls and {per_round_msgs} one-way messages per side")
        for _ in range(warmup):
            raw.call(raw_body)
        bus.calls(warmup)
        raw.oneway(per_round_msgs, raw_body)
        bus.oneway(per_round_msgs)

        for n in range(1, rounds + 1):
            say(f"bus: round {n}/{rounds}: {per_round_calls} calls, {per_round_msgs} one-way messages per side")
            with raw_cpu:
                for _ in range(per_round_calls):
                    start = time.perf_counter()
                    raw.call(raw_body)
                    raw_lat.append(time.perf_counter() - start)
            with bus_cpu:
                bus_lat += bus.calls(per_round_calls)
            raw_round = _timed(lambda: raw.oneway(per_round_msgs, raw_body))
            bus_round = _timed(lambda: bus.oneway(per_round_msgs))
            raw_time += raw_round
            bus_time += bus_round
            oneway_ratios.append(raw_round / bus_round)

    total = per_round_msgs * rounds
    raw_rate, bus_rate = total / raw_time, total / bus_time
    lookup = ring_lookup_us()
    bus_p50 = percentile(bus_lat, 50)
    results = {
        "call_p50_ratio": round(bus_p50 / percentile(raw_lat, 50), 3),
        "call_p99_ratio": round(percentile(bus_lat, 99) / percentile(raw_lat, 99), 3),
        "oneway_rate_ratio": round(bus_rate / raw_rate, 3),
        "ring_lookup_fraction_of_call_p50": round(lookup / (bus_p50 * 1e6), 5),
    }
    checks = {
        "call_p50_ratio": results["call_p50_ratio"] <= CALL_P50_TARGET,
        "oneway_rate_ratio": results["oneway_rate_ratio"] >= ONEWAY_TARGET,
        "ring_lookup_fraction_of_call_p50": results["ring_lookup_fraction_of_call_p50"] <= LOOKUP_TARGET,
    }
    return {
        "benchmark": "bus",
        "params": {"calls": per_round_calls * rounds, "messages": total, "rounds": rounds, "warmup": warmup,
                   "payload_bytes": len(raw_body), "pika_writes": pika_writes},
        "raw_call": latency_summary(raw_lat),
        "bus_call": latency_summary(bus_lat),
        **results,
        "cpu_us_per_call": {"raw": raw_cpu.per_call_us(len(raw_lat)), "bus": bus_cpu.per_call_us(len(bus_lat))},
        "raw_oneway_per_s": round(raw_rate, 1),
        "bus_oneway_per_s": round(bus_rate, 1),
        "oneway_rate_ratio_per_round": {"worst": round(min(oneway_ratios), 3),
                                        "mean": round(sum(oneway_ratios) / len(oneway_ratios), 3)},
        "ring_lookup_us": round(lookup, 3),
        "targets": {"call_p50_ratio": CALL_P50_TARGET, "oneway_rate_ratio": ONEWAY_TARGET,
                    "ring_lookup_fraction_of_call_p50": LOOKUP_TARGET},
        "checks": checks,
        "targets_met": all(checks.values()),
    }
