"""The kubelet's HTTPS endpoint, just enough for `kubectl logs` (the API server proxies to it).

The API server reaches it at the Node's InternalIP (127.0.0.1) and daemonEndpoints port. It listens
on 127.0.0.1 only, with a self-signed certificate (the devcluster API server does not verify kubelet
certificates), and does not authenticate callers: it serves nothing that is not already readable in
the pod log files. Only GET /healthz and GET /containerLogs/<ns>/<pod>/<container> exist.
"""

from __future__ import annotations

import http.server
import logging
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

KUBELET_LINE = b"[kubelet "
HANDSHAKE_TIMEOUT = 10.0  # seconds a client gets to complete the TLS handshake
_LOGS = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)/?$")


@dataclass
class LogRange:
    """Where one run of a container is in its log file; end None = still being written."""

    path: Path
    start: int
    end: int | None
    live: Callable[[], bool]


class LogNotFound(Exception):
    """No such pod/container, or no run to show; the message goes to the client."""


# resolver(namespace, pod, container, previous) -> LogRange, or raises LogNotFound
Resolver = Callable[[str, str, str, bool], LogRange]


def ensure_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed serving certificate for 127.0.0.1, made once with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not (crt.exists() and key.exists()):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(crt), "-days", "3650", "-subj", f"/CN={name}",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True,
        )
        key.chmod(0o600)
    return crt, key


def read_run(r: LogRange, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The run's output so far, without the kubelet's own lines."""
    with open(r.path, "rb") as f:
        f.seek(r.start)
        data = f.read() if r.end is None else f.read(max(r.end - r.start, 0))
    lines = [ln for ln in data.splitlines(keepends=True) if not ln.startswith(KUBELET_LINE)]
    if tail_lines is not None:
        lines = lines[-tail_lines:] if tail_lines > 0 else []
    out = b"".join(lines)
    return out[:limit_bytes] if limit_bytes is not None else out


def follow(r: LogRange, offset: int, stop: threading.Event) -> Iterator[bytes]:
    """New complete lines appended after `offset` while the run is live."""
    pending = b""
    while not stop.is_set():
        with open(r.path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        pending += chunk
        if b"\n" in pending:
            done, pending = pending.rsplit(b"\n", 1)
            lines = [ln + b"\n" for ln in done.split(b"\n") if not ln.startswith(KUBELET_LINE)]
            if lines:
                yield b"".join(lines)
        if not chunk and not r.live():
            break
        time.sleep(0.2)
    if pending and not pending.startswith(KUBELET_LINE):
        yield pending


class KubeletServer:
    """Threaded HTTPS server on 127.0.0.1 (port picked by the kernel)."""

    def __init__(self, cert_dir: Path, node_name: str, resolver: Resolver) -> None:
        crt, key = ensure_cert(cert_dir, node_name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        self._stop = threading.Event()
        handler = _handler(resolver, self._stop)
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # The handshake happens in the handler thread (Handler.setup), so a silent client cannot block accept().
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kubelet-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("kubelet endpoint on https://127.0.0.1:%d", self.port)

    def stop(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(resolver: Resolver, stop: threading.Event) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "devcluster-kubelet"
        handshake_ok = False

        def setup(self) -> None:
            sock = self.request
            sock.settimeout(HANDSHAKE_TIMEOUT)
            try:
                sock.do_handshake()
                self.handshake_ok = True
            except OSError as e:  # ssl.SSLError and timeouts included
                log.debug("http: TLS handshake with %s failed: %s", self.client_address, e)
            sock.settimeout(None)
            super().setup()

        def handle(self) -> None:
            if self.handshake_ok:
                super().handle()

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

        def _text(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/healthz":
                self._text(200, "ok")
                return
            m = _LOGS.match(url.path)
            if not m:
                self._text(404, f"{url.path}: not served by the process kubelet (only /containerLogs)\n")
                return
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            ns, pod, container = (unquote(x) for x in m.groups())
            try:
                r = resolver(ns, pod, container, q.get("previous") == "true")
            except LogNotFound as e:
                self._text(400 if "waiting" in str(e) else 404, str(e))
                return
            tail = int(q["tailLines"]) if q.get("tailLines", "").lstrip("-").isdigit() else None
            limit = int(q["limitBytes"]) if q.get("limitBytes", "").isdigit() else None
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            try:
                size = r.path.stat().st_size
                self.wfile.write(read_run(LogRange(r.path, r.start, r.end if r.end is not None else size,
                                                   r.live), tail, limit))
                if q.get("follow") == "true" and r.end is None:
                    for chunk in follow(r, size, stop):
                        self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

    return Handler
