"""Common lifecycle of a private server instance: spawn, wait until ready, pause, stop by pid.

An instance lives in one directory. ``state.json`` (mode 0600) keeps its ports and generated credentials,
so ``stop()`` + ``start()`` (or a new object on the same directory) comes back on the same ports with the
same data and passwords. Processes are only ever signalled by pid, after checking the kernel start time,
so a recycled pid is never hit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from zstack_devcluster.ports import free_ports, port_is_free
from zstack_devcluster.procs import ProcInfo, all_procs, read_proc

Say = Callable[[str], None]
log = logging.getLogger(__name__)

_running: set[Service] = set()
_running_lock = threading.Lock()


class ServiceError(RuntimeError):
    """A server could not start or stop; the message says what to check and ends with its log tail."""


@dataclass
class Child:
    """A process we spawned (in its own session) plus its kernel start time."""

    name: str
    popen: subprocess.Popen[bytes]
    start_time: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """Running (not exited, not a zombie): we are its parent, so poll() is exact."""
        return self.popen.poll() is None


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that it does not exist."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


_ERROR_RE = re.compile(r"\[error\]|\bERROR\b|\bFATAL\b|\bPANIC\b|BOOT FAILED", re.I)
_RUN_MARK = "devcluster starts "


def first_errors(path: Path, lines: int = 12) -> list[str]:
    """The first error lines of the latest run in a log (runs start at a ``devcluster starts`` marker)."""
    try:
        text = path.read_bytes()[-512 * 1024:].decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    run = text[text.rfind(_RUN_MARK):] if _RUN_MARK in text else text
    return [line for line in run.splitlines() if _ERROR_RE.search(line)][:lines]


def is_alive(proc: ProcInfo) -> bool:
    """Whether the process recorded as ``proc`` still runs (same pid *and* start time, not a zombie)."""
    now = read_proc(proc.pid)
    return now is not None and now.start_time == proc.start_time and now.state not in ("Z", "X")


def tree(root: ProcInfo) -> list[ProcInfo]:
    """``root``, its live descendants (by parent pid) and the live members of its process group."""
    procs = all_procs()
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    # The kernel never reuses a pid that is still some group's id, so the group is ours unless the pid now
    # belongs to a different process (our group emptied, then the pid was recycled).
    now = next((p for p in procs if p.pid == root.pid), None)
    group_is_ours = now is None or now.start_time == root.start_time
    found = {p.pid: p for p in procs
             if group_is_ours and p.pgid == root.pid and p.start_time >= root.start_time}
    if is_alive(root):
        found[root.pid] = root
        stack = [root.pid]
        while stack:
            for child in children.get(stack.pop(), []):
                if child.pid not in found:
                    found[child.pid] = child
                    stack.append(child.pid)
    return [p for p in found.values() if p.state not in ("Z", "X")]


class Service:
    """Base class: subclasses define how to prepare, launch and probe the server."""

    kind: ClassVar[str] = "service"
    default_startup_timeout: ClassVar[float] = 60.0

    def __init__(self, base_dir: Path, *, startup_timeout: float | None = None, say: Say | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout or self.default_startup_timeout
        self._say = say or log.info
        self._state_path = self.base_dir / "state.json"
        self._state: dict[str, Any] = self._load_state()
        self._children: list[Child] = []
        self._known: dict[int, ProcInfo] = {}  # every process of ours seen while running
        self._paused = False
        self._lock = threading.RLock()

    # -- state -------------------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}

    def _save_state(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self._state, fh, indent=2, sort_keys=True)
        os.replace(tmp, self._state_path)

    def _secret(self, key: str, nbytes: int = 16) -> str:
        """A random hex secret, generated once per instance directory and kept in state.json."""
        if key not in self._state:
            self._state[key] = secrets.token_hex(nbytes)
            self._save_state()
        return self._state[key]

    def _ensure_ports(self, *names: str) -> None:
        """Pick free ports for the names that have none yet (kept for the life of the directory)."""
        missing = [n for n in names if n not in self._state]
        if missing:
            for name, port in zip(missing, free_ports(len(missing), self.host), strict=True):
                self._state[name] = port
            self._save_state()

    def _port(self, name: str) -> int:
        try:
            return int(self._state[name])
        except KeyError:
            raise RuntimeError(f"{self.kind} in {self.base_dir} has no {name} yet: call start() first") from None

    # -- to implement ------------------------------------------------------------------------------------

    host: str = "127.0.0.1"

    def _port_names(self) -> tuple[str, ...]:
        """State keys of the ports the server listens on."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create directories, config files and first-time data (runs before every launch)."""
        raise NotImplementedError

    def _launch(self) -> None:
        """Spawn the processes (via :meth:`_spawn`); the main server must be the last child."""
        raise NotImplementedError

    def _probe(self) -> bool:
        """True when the server really serves clients; may raise (the error is shown while waiting)."""
        raise NotImplementedError

    def _after_ready(self) -> None:
        """Post-start setup (for example creating a role); runs after every successful start."""

    def _log_files(self) -> list[Path]:
        """Logs whose tails explain a failed start."""
        raise NotImplementedError

    def log_files(self) -> list[Path]:
        """The server's logs (tests read them, e.g. to prove no secret is ever written there)."""
        return [path for path in self._log_files() if path.exists()]

    def _hint(self) -> str:
        """What to check when the server does not come up."""
        return ""

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGTERM

    @property
    def password(self) -> str:
        return self._state["password"]

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def display_url(self) -> str:
        """:attr:`url` with the password masked, for logs and messages."""
        return self.url.replace(f":{self.password}@", ":***@")

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """Whether the main server process we started is alive."""
        return bool(self._children) and self._children[-1].alive()

    def start(self) -> Self:
        """Start the server and wait until it accepts clients; a no-op when it already runs."""
        with self._lock:
            if self.is_running:
                if self._paused:
                    self.resume()
                return self
            self._kill_leftovers()
            self._ensure_ports(*self._port_names())
            busy = [f"{name}={self._port(name)}" for name in self._port_names()
                    if not port_is_free(self._port(name), self.host)]
            if busy:
                raise ServiceError(
                    f"{self.kind} in {self.base_dir} cannot start: port(s) {', '.join(busy)} on {self.host} are "
                    f"in use by another process (check with `ss -ltnp`)."
                )
            t0 = time.monotonic()
            try:
                self._prepare()
                self._launch()
                self._wait_ready(t0)
                self._after_ready()
            except BaseException:
                try:
                    self._stop_children(grace=5.0)
                except Exception as err:
                    log.error("%s: cleanup after a failed start failed too: %s", self.kind, err)
                raise
            with _running_lock:
                _running.add(self)
            self._say(f"{self.kind} ready on {self.host}:{self._port(self._port_names()[0])} "
                      f"in {time.monotonic() - t0:.1f}s ({self.base_dir})")
            return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every process of the instance (gracefully, then SIGKILL after ``timeout``); data is kept."""
        with self._lock:
            if not self._children:
                return
            t0 = time.monotonic()
            self._stop_children(grace=timeout)
            with _running_lock:
                _running.discard(self)
            self._say(f"{self.kind} stopped in {time.monotonic() - t0:.1f}s")

    @property
    def pod_network(self) -> tuple[str, str] | None:
        """(address, clients): where the server also listens for pods, and the network they come from."""
        entry = self._state.get("pod_network")
        return (entry["address"], entry["clients"]) if entry else None

    def serve_pods(self, address: str, clients: str) -> Self:
        """Also listen on `address` (the host's end of a container node's veth) and accept clients from the
        network `clients` (its pods); kept across restarts. Restarts a running server whose setting changed."""
        with self._lock:
            if self.pod_network == (address, clients):
                return self
            self._state["pod_network"] = {"address": address, "clients": clients}
            self._save_state()
            if self.is_running:
                self._say(f"{self.kind}: restarting to also serve pods on {address} (clients {clients})")
                self.restart()
            return self

    def url_for_pods(self, url: str) -> str:
        """`url` (one of this server's) with the address pods reach it on; needs :meth:`serve_pods` first."""
        if self.pod_network is None:
            raise RuntimeError(f"{self.kind} in {self.base_dir} serves no pods: call serve_pods() first")
        return url.replace(f"@{self.host}:", f"@{self.pod_network[0]}:", 1)

    def restart(self) -> Self:
        """stop() then start(): same ports, same data, same credentials."""
        self.stop()
        return self.start()

    @contextlib.contextmanager
    def stopped(self, timeout: float = 30.0) -> Iterator[None]:
        """``with svc.stopped(): ...`` runs the block while the server is down, then starts it again."""
        self.stop(timeout)
        try:
            yield
        finally:
            self.start()

    def pause(self) -> None:
        """Freeze every server process (SIGSTOP): connections stay open but nothing answers."""
        with self._lock:
            if not self.is_running:
                raise RuntimeError(f"{self.kind} is not running")
            self._signal_all(signal.SIGSTOP, server_only=True)
            self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        with self._lock:
            self._signal_all(signal.SIGCONT, server_only=True)
            self._paused = False

    @property
    def pids(self) -> list[int]:
        """Pids of every live process of the instance (children, their descendants and groups)."""
        return sorted(p.pid for p in self._live_procs())

    @property
    def root_pids(self) -> list[int]:
        """Pids of the processes we spawned (each leads its own session and process group)."""
        return [c.pid for c in self._children]

    @property
    def known_procs(self) -> list[ProcInfo]:
        """Every process of the instance seen since the last start (alive or not): for leak checks."""
        self._remember()
        return list(self._known.values())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.base_dir} {state}>"

    # -- helpers for subclasses ----------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> Child:
        """Start ``argv`` in a new session with stdout/stderr appended to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as fh:
            fh.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} devcluster starts {name}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                cwd=cwd or self.base_dir, start_new_session=True, close_fds=True,
            )
        info = read_proc(popen.pid)
        child = Child(name=name, popen=popen, start_time=info.start_time if info else 0)
        self._children.append(child)
        self._known[popen.pid] = info or ProcInfo(popen.pid, os.getpid(), popen.pid, 0, "R")
        return child

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        next_report = time.monotonic() + 5.0
        last_error = "no answer yet"
        while True:
            self._remember()
            for child in self._children:
                if not child.alive():
                    raise ServiceError(self._failure(
                        f"{child.name} (pid {child.pid}) exited with code {child.popen.returncode} "
                        f"{time.monotonic() - t0:.1f}s into startup"))
            try:
                if self._probe():
                    return
            except Exception as err:  # any failure just means "not ready yet"
                last_error = f"{type(err).__name__}: {err}".strip()
            now = time.monotonic()
            if now >= deadline:
                raise ServiceError(self._failure(
                    f"it did not accept connections within {self.startup_timeout:.0f}s (last probe: {last_error})"))
            if now >= next_report:
                self._say(f"  still waiting for {self.kind} on {self.host}:"
                          f"{self._port(self._port_names()[0])} ({now - t0:.0f}s; last probe: {last_error})")
                next_report = now + 5.0
            time.sleep(0.05 if now - t0 < 5 else 0.2)

    def _failure(self, what: str) -> str:
        parts = [f"{self.kind} in {self.base_dir} failed to start: {what}."]
        if hint := self._hint():
            parts.append(hint)
        for path in self._log_files():
            last = tail(path)
            errors = [line for line in first_errors(path) if line not in last]
            if errors:
                parts.append(f"--- first error lines of this run in {path}:\n" + "\n".join(errors))
            parts.append(f"--- last lines of {path}:\n{last}")
        return "\n".join(parts)

    def _remember(self) -> None:
        """Record every process currently in our children's trees (they may be reparented later)."""
        for child in self._children:
            root = self._known.get(child.pid)
            if root is not None:  # a dead root still leads to the members of its process group
                for proc in tree(root):
                    self._known.setdefault(proc.pid, proc)

    def _live_procs(self) -> list[ProcInfo]:
        self._remember()
        return [p for p in self._known.values() if is_alive(p)]

    def _signal_all(self, sig: signal.Signals, *, server_only: bool = False) -> None:
        self._remember()
        roots = self._children[-1:] if server_only else self._children
        targets: dict[int, ProcInfo] = {}
        for child in roots:
            root = self._known.get(child.pid)
            if root is not None:
                targets.update((p.pid, p) for p in tree(root))
        for proc in targets.values():
            if is_alive(proc):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, sig)

    def _stop_children(self, grace: float) -> None:
        """Stop the server (last child first), then helpers; SIGKILL whatever outlives ``grace``."""
        self._remember()
        if self._paused:
            self._signal_all(signal.SIGCONT)
        for child in reversed(self._children):
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(self._stop_signal() if child is self._children[-1] else signal.SIGTERM)
                try:
                    child.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._say(f"{self.kind}: {child.name} (pid {child.pid}) ignored the stop signal "
                              f"for {grace:.0f}s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        child.popen.kill()
                    child.popen.wait(timeout=10)
            self._remember()
        self._paused = False
        # Descendants in their own sessions (erl_child_setup, postgres backends) normally exit with
        # their parent; whatever is left after a short grace is killed by pid.
        deadline = time.monotonic() + 5.0
        while (left := [p for p in self._known.values() if is_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while (left := [p for p in self._known.values() if is_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            raise ServiceError(f"{self.kind}: processes {[p.pid for p in left]} survived SIGKILL")
        self._children.clear()

    def _kill_leftovers(self) -> None:
        """Reap children of a previous run that died on their own (a crashed server)."""
        if self._children:
            self._stop_children(grace=5.0)
        self._known.clear()


def _stop_all_at_exit() -> None:
    with _running_lock:
        leftovers = list(_running)
    for svc in leftovers:
        with contextlib.suppress(Exception):
            svc.stop(timeout=10.0)


atexit.register(_stop_all_at_exit)
