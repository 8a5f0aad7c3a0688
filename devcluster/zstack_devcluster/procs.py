"""Process supervision by pid: spawn in a new session, check liveness, stop whole process groups.

Every check compares the kernel start time recorded at spawn, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster.state import ProcRecord


@dataclass(frozen=True)
class ProcInfo:
    """One line of /proc: what we need to identify and group a process."""

    pid: int
    ppid: int
    pgid: int
    start_time: int
    state: str


def read_proc(pid: int) -> ProcInfo | None:
    """Parse /proc/<pid>/stat; None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), start_time=int(rest[19]), state=rest[0])


def all_procs() -> list[ProcInfo]:
    """Every process currently visible in /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                out.append(info)
    return out


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (the pytest fixture case)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(pid: int, start_time: int) -> bool:
    """True when ``pid`` is still the process that started at ``start_time`` and is not a zombie."""
    _reap(pid)
    info = read_proc(pid)
    return info is not None and info.start_time == start_time and info.state not in ("Z", "X")


def record_alive(rec: ProcRecord | None) -> bool:
    """Liveness of a recorded process."""
    return rec is not None and is_alive(rec.pid, rec.start_time)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> ProcRecord:
    """Start ``argv`` in its own session (so its whole group can be stopped), logging to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
        )
    info = read_proc(proc.pid)
    start_time = info.start_time if info else 0
    return ProcRecord(pid=proc.pid, start_time=start_time, argv=list(argv), log=str(log))


def descendants(roots: list[ProcRecord]) -> list[ProcInfo]:
    """Every live descendant (by parent pid) of the recorded processes."""
    procs = all_procs()
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out: list[ProcInfo] = []
    stack = [r.pid for r in roots if record_alive(r)]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child.pid)
    return out


def _group_members(pgid: int, not_before: int) -> list[ProcInfo]:
    """Live members of process group ``pgid`` that started no earlier than ``not_before``."""
    return [
        p for p in all_procs()
        if p.pgid == pgid and p.start_time >= not_before and p.state not in ("Z", "X")
    ]


def _signal_group(pgid: int, not_before: int, sig: signal.Signals) -> bool:
    """Signal a process group if it still holds processes of ours. Returns whether any were signalled."""
    if not _group_members(pgid, not_before):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    return True


def stop_groups(groups: list[tuple[int, int]], grace: float) -> None:
    """SIGTERM each (pgid, start_time) group, wait up to ``grace`` seconds, then SIGKILL what remains."""
    live = [g for g in groups if _signal_group(g[0], g[1], signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        for pgid, _ in live:
            _reap(pgid)
        live = [g for g in live if _group_members(*g)]
    for pgid, not_before in live:
        _signal_group(pgid, not_before, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        for pgid, _ in live:
            _reap(pgid)
        live = [g for g in live if _group_members(*g)]
        if live:
            time.sleep(0.05)
