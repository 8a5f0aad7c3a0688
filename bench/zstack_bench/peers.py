"""Start a benchmark peer process and wait until it says it is ready."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence


class PeerFailed(RuntimeError):
    """A peer process exited or did not become ready in time."""


@contextlib.contextmanager
def peer(module: str, args: Sequence[str], *, ready_timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m <module> <args>`; yield once it prints `ready`; end it on exit.

    The peer exits by itself when its stdin closes, so it never outlives this process.
    """
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        _wait_ready(proc, module, ready_timeout)
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _wait_ready(proc: subprocess.Popen[bytes], module: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerFailed(f"{module} did not become ready within {timeout:g}s")
        readable, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if readable:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                raise PeerFailed(f"{module} exited with {proc.wait()} before it was ready")
        elif proc.poll() is not None:
            raise PeerFailed(f"{module} exited with {proc.returncode} before it was ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
