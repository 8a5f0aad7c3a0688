"""Kubernetes Events about pods (Started, Killing, Unhealthy, BackOff, ...), sent in the background.

Repeats of the same (object, reason, message) bump `count` on the existing
Event instead of creating new ones, like the real event recorder does.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from typing import Any

from zstack_kube.client import Client
from zstack_kube.errors import ApiError
from zstack_kube.times import now

log = logging.getLogger(__name__)

COMPONENT = "kubelet"


class Recorder:
    """Fire-and-forget event sink; never blocks the caller."""

    def __init__(self, api: Client, node_name: str) -> None:
        self._api = api
        self._node = node_name
        self._q: queue.Queue[tuple[dict[str, Any], str, str, str] | None] = queue.Queue(maxsize=1000)
        self._seen: dict[tuple[str, str, str], tuple[str, str, int, float]] = {}
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def pod_event(self, pod: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """Queue an event (kind Normal or Warning) about a pod."""
        with contextlib.suppress(queue.Full):
            self._q.put_nowait((pod, kind, reason, message[:1024]))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._send(*item)
            except ApiError as e:
                log.debug("event not recorded: %s", e)
            except Exception:  # never let the recorder die
                log.exception("event recorder")

    def _send(self, pod: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        key = (meta["uid"], reason, message)
        ns = meta["namespace"]
        seen = self._seen.get(key)
        ts = now()
        if seen and time.time() - seen[3] < 600:
            name, first, count, _ = seen
            try:
                self._api.patch(f"/api/v1/namespaces/{ns}/events/{name}", {"count": count + 1, "lastTimestamp": ts})
                self._seen[key] = (name, first, count + 1, time.time())
                return
            except ApiError:
                pass
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": ns, "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "count": 1,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "eventTime": None,
            "reportingComponent": COMPONENT,
            "reportingInstance": self._node,
            "source": {"component": COMPONENT, "host": self._node},
        }
        self._api.create(f"/api/v1/namespaces/{ns}/events", body)
        if len(self._seen) > 5000:
            self._seen.clear()
        self._seen[key] = (name, ts, 1, time.time())
