"""Probe and lifecycle-hook handlers (exec, httpGet, tcpSocket, grpc, sleep) and probe workers."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zstack_devcluster.kubelet.envvars import expand
from zstack_devcluster.kubelet.runtime import resolve, run_exec

log = logging.getLogger(__name__)

USER_AGENT = "kube-probe/1.36"


@dataclass
class Target:
    """What a handler runs against: the pod IP, named ports and the container's env and root."""

    pod_ip: str
    ports: dict[str, int]
    env: dict[str, str]
    cwd: Path

    @classmethod
    def for_container(cls, container: dict[str, Any], pod_ip: str, env: dict[str, str], cwd: Path) -> Target:
        ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports") or [] if p.get("name")}
        return cls(pod_ip=pod_ip, ports=ports, env=env, cwd=cwd)

    def port(self, value: int | str) -> int:
        if isinstance(value, int):
            return value
        if value.isdigit():
            return int(value)
        if value not in self.ports:
            raise ValueError(f"no container port named {value!r}")
        return self.ports[value]


def run_handler(handler: dict[str, Any], target: Target, timeout: float) -> tuple[bool, str]:
    """Run one probe/hook action; (success, message)."""
    try:
        if "exec" in handler:
            return _exec(handler["exec"].get("command") or [], target, timeout)
        if "httpGet" in handler:
            return _http_get(handler["httpGet"], target, timeout)
        if "tcpSocket" in handler:
            h = handler["tcpSocket"]
            return _tcp(h.get("host") or target.pod_ip, target.port(h["port"]), timeout)
        if "grpc" in handler:  # emulated: a TCP connect, no grpc.health.v1 call
            return _tcp(target.pod_ip, int(handler["grpc"]["port"]), timeout)
        if "sleep" in handler:
            time.sleep(min(float(handler["sleep"].get("seconds", 0)), timeout))
            return True, ""
    except (OSError, ValueError, http.client.HTTPException) as e:
        return False, f"{type(e).__name__}: {e}"
    return False, f"unsupported handler {sorted(handler)}"


def _exec(command: list[str], target: Target, timeout: float) -> tuple[bool, str]:
    if not command:
        return False, "exec handler without command"
    argv = [expand(c, target.env) for c in command]
    exe = resolve(argv[0], target.env.get("PATH"), target.cwd)
    if exe is None:
        return False, f"executable {argv[0]!r} not found on the host"
    rc, out = run_exec([exe, *argv[1:]], target.env, target.cwd, timeout)
    if rc == 0:
        return True, ""
    return False, (f"command {argv!r} exited with {rc}: " if rc > 0 else "") + out.strip()


def _http_get(h: dict[str, Any], target: Target, timeout: float) -> tuple[bool, str]:
    host = h.get("host") or target.pod_ip
    port = target.port(h.get("port", 80))
    path = h.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    for hd in h.get("httpHeaders") or []:
        headers[hd["name"]] = hd["value"]
    if (h.get("scheme") or "HTTP").upper() == "HTTPS":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read(1024)
    finally:
        conn.close()
    if 200 <= resp.status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {resp.status} {body[:200].decode(errors='replace')}"


def _tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    with socket.create_connection((host, port), timeout=timeout):
        return True, ""


@dataclass
class ProbeSpec:
    """The timing fields of a probe with Kubernetes defaults."""

    handler: dict[str, Any]
    initial_delay: float = 0
    period: float = 10
    timeout: float = 1
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def parse(cls, probe: dict[str, Any]) -> ProbeSpec:
        return cls(
            handler=probe,
            initial_delay=float(probe.get("initialDelaySeconds", 0)),
            period=float(probe.get("periodSeconds", 10)),
            timeout=float(probe.get("timeoutSeconds", 1)),
            success_threshold=int(probe.get("successThreshold", 1)),
            failure_threshold=int(probe.get("failureThreshold", 3)),
        )


@dataclass
class Prober:
    """A worker thread probing one container run.

    kind "readiness": `result` starts False and follows the thresholds.
    kind "liveness":  `failed` becomes True once failureThreshold probes failed in a row.
    kind "startup":   `result` becomes True on success; `failed` as for liveness.
    Liveness and readiness wait until `started()` is true.
    """

    kind: str
    spec: ProbeSpec
    target: Target
    container_started_at: float
    started: Callable[[], bool]
    on_change: Callable[[Prober, str], None]
    result: bool = False
    failed: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, name: str) -> None:
        self.result = self.kind == "liveness"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        successes = failures = 0
        delay = self.container_started_at + self.spec.initial_delay - time.time()
        if delay > 0 and self._stop.wait(delay):
            return
        while not self._stop.is_set():
            if self.kind != "startup" and not self.started():
                self._stop.wait(min(self.spec.period, 0.5))
                continue
            ok, msg = run_handler(self.spec.handler, self.target, self.spec.timeout)
            if self._stop.is_set():
                return
            if ok:
                successes, failures = successes + 1, 0
            else:
                successes, failures = 0, failures + 1
            if self._update(ok, successes, failures, msg):
                return
            self._stop.wait(self.spec.period)

    def _update(self, ok: bool, successes: int, failures: int, msg: str) -> bool:
        """Apply one result; True when this prober is done."""
        if not ok:
            log.debug("%s probe failed (%d in a row): %s", self.kind, failures, msg)
            self.on_change(self, f"{self.kind.capitalize()} probe failed: {msg}".strip())
        if self.kind == "readiness":
            if ok and not self.result and successes >= self.spec.success_threshold:
                self.result = True
                self.on_change(self, "")
            elif not ok and self.result and failures >= self.spec.failure_threshold:
                self.result = False
                self.on_change(self, "")
            return False
        if self.kind == "startup" and ok:
            self.result = True
            self.on_change(self, "")
            return True
        if not ok and failures >= self.spec.failure_threshold:
            self.failed = True
            self.on_change(self, f"{self.kind.capitalize()} probe failed {failures} times: {msg}".strip())
            return True
        return False
