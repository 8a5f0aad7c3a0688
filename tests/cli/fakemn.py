"""A scripted stand-in for an MN on 127.0.0.1: it records each request and answers the next scripted action.

Actions: `Answer` (a JSON answer), or one of the ways an answer gets lost: "drop" (close without a word),
"reset" (TCP reset), "partial" (half a body), "garbage" (not HTTP) and "hang" (say nothing until the test
ends, so the client times out). The last action repeats.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOST = ("drop", "reset", "partial", "garbage", "hang")


@dataclass(frozen=True)
class Answer:
    status: int = 200
    doc: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


Action = Answer | str


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class FakeMn:
    """Serves `actions` in turn on 127.0.0.1 (port 0 picks a free one), over HTTPS with `ssl_context`; use as a
    context manager."""

    def __init__(self, *actions: Action, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.actions = list(actions)
        self.seen: list[Seen] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        if ssl_context is not None:  # the handshake runs at accept; a failed one drops that connection only
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeMn:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()

    def keys(self, method: str | None = None) -> list[str | None]:
        """The Idempotency-Key of each request (of `method`), in order."""
        return [s.headers.get("idempotency-key") for s in self.seen if method in (None, s.method)]

    def _next(self, seen: Seen) -> Action:
        with self._lock:
            self.seen.append(seen)
            return self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mn = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = Seen(self.command, parts.path, dict(urllib.parse.parse_qsl(parts.query)),
                            {k.lower(): v for k, v in self.headers.items()}, json.loads(raw) if raw else None)
                action = mn._next(seen)
                if isinstance(action, Answer):
                    self._answer(action)
                else:
                    self._lose(action)

            do_GET = do_POST = do_DELETE = _serve  # noqa: N815 - http.server's naming

            def _answer(self, answer: Answer) -> None:
                data = json.dumps(answer.doc).encode()
                self.send_response(answer.status)
                for name, value in {"Content-Type": "application/json", **answer.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _lose(self, how: str) -> None:
                self.close_connection = True
                if how == "hang":
                    mn.released.wait(30)
                elif how == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                elif how == "partial":
                    self.wfile.write(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 1000\r\n\r\n{\"job\": {")
                elif how == "garbage":
                    self.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n")

            def log_message(self, *_args: object) -> None:
                pass

        return Handler


def job(job_id: str = "c" * 32, state: str = "Pending", operation: str = "vm.create") -> dict[str, Any]:
    """A job document shaped like the API's."""
    return {"id": job_id, "operation": operation, "resource_uuid": "b" * 32, "parameters": {}, "state": state,
            "result": None, "error": None, "mn": None, "created_at": "2026-11-26T06:00:02Z",
            "updated_at": "2026-11-26T06:00:02Z", "finished_at": None}


def accepted(replayed: bool = False) -> Answer:
    """A 202 with a job (as a replay of an earlier key when `replayed`)."""
    return Answer(202, {"job": job()}, {"Idempotent-Replayed": "true"} if replayed else {})


def refused(status: int, code: str, message: str, retry_after: str | None = None,
            field_name: str | None = None) -> Answer:
    """An error answer in the API's shape."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return Answer(status, {"error": {"code": code, "message": message, "field": field_name}}, headers)
