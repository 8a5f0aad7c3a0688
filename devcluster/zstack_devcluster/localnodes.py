"""Management nodes as local processes: used by the tests, the benchmarks and the demo."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from zstack_devcluster.ports import free_port

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, ValueError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            hint = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{hint}")
        time.sleep(interval)


@dataclass
class LocalNode:
    """One `zstack-node` process with its own HTTP port and log file."""

    name: str
    broker_url: str
    database_url: str
    log_dir: Path
    services: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None  # with the options tls_cert_file and tls_key_file: the CA that verifies the node

    @property
    def url(self) -> str:
        return f"{'https' if self.options.get('tls_cert_file') else 'http'}://127.0.0.1:{self.http_port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https") else None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> LocalNode:
        args = [sys.executable, "-m", "zstack_node", "--http-bind", "127.0.0.1", "--http-port", str(self.http_port),
                "--hostname", self.name, "--advertise-address", "127.0.0.1"]
        for spec in self.services:
            args += ["--service", spec]
        for key, value in self.options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "ZSTACK_BROKER_URL": self.broker_url, "ZSTACK_DATABASE_URL": self.database_url,
               **self.env}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def get(self, path: str, timeout: float = 2.0) -> Any:
        """GET a JSON document from this node's HTTP port (any status code)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout, context=self._ssl_context()) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            return json.load(err)

    def text(self, path: str, timeout: float = 2.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout, context=self._ssl_context()) as response:
            return response.read().decode()

    def ring(self) -> dict[str, Any]:
        return self.get("/v1/cluster/ring")

    def ready(self) -> bool:
        return bool(self.get("/readyz").get("ready"))

    def wait_ready(self, timeout: float = 30.0) -> LocalNode:
        def check() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.tail()}")
            return self.ready()

        wait_until(check, timeout, f"{self.name} to become ready (log {self.log_path})")
        return self

    @property
    def uuid(self) -> str:
        return self.ring()["self"]

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful leave), then SIGKILL of the whole group if it does not exit."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def agreed_members(nodes: Iterable[LocalNode]) -> frozenset[str] | None:
    """The member set every running node reports, or None while they disagree."""
    views = {frozenset(node.ring()["members"]) for node in nodes}
    return next(iter(views)) if len(views) == 1 else None
