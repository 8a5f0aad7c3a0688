"""A test-only service: echoes, sleeps, and records takeovers to a file the tests read."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from zstack_node.bus.cloudbus import BusError
from zstack_node.bus.envelope import Envelope
from zstack_node.ring import Ring, RingChange
from zstack_node.service import Service, ServiceError, handles


def demo_keys() -> list[str]:
    """The resource UUIDs the demo 'owns' as a cluster, from DEMO_KEYS_FILE (one per line)."""
    path = os.environ.get("DEMO_KEYS_FILE")
    return Path(path).read_text().split() if path else []


class DemoService(Service):
    name = "demo"

    def _record(self, event: str, **fields: Any) -> None:
        path = os.environ.get("DEMO_RECORD_FILE")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps({"event": event, "mn": self.ctx.uuid, **fields}) + "\n")

    @handles("Echo")
    async def echo(self, msg: Envelope) -> dict[str, Any]:
        return {"mn": self.ctx.uuid, "resource": msg.resource, "body": msg.body}

    @handles("Sleep")
    async def sleep(self, msg: Envelope) -> dict[str, Any]:
        self._record("sleep", resource=msg.resource)
        await asyncio.sleep(float(msg.body.get("seconds", 1)))
        return {"mn": self.ctx.uuid}

    @handles("Relay")
    async def relay(self, msg: Envelope) -> dict[str, Any]:
        """Call demo/Sleep on the owner of body.resource from this MN, and report how it ended."""
        started = time.monotonic()
        try:
            reply = await self.ctx.bus.call(
                "demo", "Sleep", {"seconds": msg.body["seconds"]}, resource=msg.body["resource"],
                timeout=msg.body["timeout"], idempotent=msg.body["idempotent"])
            outcome = {"ok": True, "mn": reply["mn"]}
        except BusError as exc:
            outcome = {"ok": False, "code": exc.code, "message": str(exc)}
        return {**outcome, "elapsed": time.monotonic() - started}

    @handles("Submit")
    async def submit(self, msg: Envelope) -> dict[str, Any]:
        """Publish a Note for body.resource on the durable API queue, with a publisher confirm."""
        await self.ctx.bus.send_api("demo", "Note", {"tag": msg.body["tag"]}, resource=msg.body["resource"])
        return {"confirmed": True}

    @handles("Fail")
    async def fail(self, msg: Envelope) -> dict[str, Any]:
        raise ServiceError("DemoFailure", f"asked to fail: {msg.body.get('why', '')}")

    @handles("Note")
    async def note(self, msg: Envelope) -> None:
        self._record("note", resource=msg.resource, body=msg.body)

    async def on_self_joined(self, ring: Ring) -> None:
        self._record("self_joined", members=sorted(ring.members))

    async def on_node_left(self, change: RingChange) -> None:
        gained = change.gained_by(self.ctx.uuid, demo_keys())
        if gained:
            self._record("takeover", left=sorted(change.left), gained=sorted(gained))

    async def on_self_dead(self) -> None:
        self._record("self_dead")
