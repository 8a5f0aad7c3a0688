"""Container processes: start in a new session, signal the whole group, reap.

Each container runs as the leader of its own session and process group
(start_new_session=True), so one killpg reaches everything it spawned, the way
a container runtime kills the whole PID namespace. When the main process
exits, whatever is left in its group is killed as well. A pidfile per running
container lets a restarted kubelet kill the groups a crashed one left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zstack_kube.times import to_rfc3339

log = logging.getLogger(__name__)


@dataclass
class Process:
    """One run of a container."""

    popen: subprocess.Popen[bytes]
    started_at: float
    pidfile: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        """Whether the main process has exited (it is not reaped, so its group id stays reserved)."""
        if self.popen.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def poll(self) -> int | None:
        """Return code once the main process has exited; what is left of its group is killed first."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        if not self.exited():
            return None
        signal_group(self.pid, signal.SIGKILL)  # the zombie leader still holds the group id
        rc = self.popen.wait()
        if self.pidfile:
            self.pidfile.unlink(missing_ok=True)
        return rc


def resolve(command: str, path_env: str | None, cwd: Path) -> str | None:
    """Absolute path of an executable as the container would find it, or None."""
    if "/" in command:
        p = Path(command) if os.path.isabs(command) else cwd / command
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which(command, path=path_env if path_env is not None else os.defpath)


def log_line(log_path: Path, text: str) -> None:
    """Append a kubelet line to a container log."""
    with open(log_path, "a") as f:
        f.write(f"[kubelet {to_rfc3339(time.time())}] {text}\n")


def start(
    executable: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path, pidfile: Path | None
) -> Process:
    """Start a container process; stdout and stderr are appended to log_path."""
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            executable=executable,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    if pidfile:
        pidfile.write_text(f"{popen.pid} {start_time(popen.pid) or ''}\n")
    return Process(popen=popen, started_at=time.time(), pidfile=pidfile)


def signal_group(pgid: int, sig: int) -> bool:
    """Send sig to a process group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("no permission to signal process group %s", pgid)
        return False


def stop(proc: Process, grace: float, sig: int = signal.SIGTERM) -> int:
    """Send sig (SIGTERM) to the group, SIGKILL it after `grace` seconds; return the exit code."""
    if not proc.exited():
        signal_group(proc.pid, sig)
        deadline = time.monotonic() + max(grace, 0)
        while not proc.exited() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not proc.exited():
            signal_group(proc.pid, signal.SIGKILL)
    rc = proc.poll()
    while rc is None:
        time.sleep(0.02)
        rc = proc.poll()
    return rc


def exit_details(rc: int) -> tuple[int, int | None, str]:
    """(exitCode, signal, reason) in Kubernetes terms for a Popen return code."""
    if rc < 0:
        return 128 - rc, -rc, "Error"
    return rc, None, "Completed" if rc == 0 else "Error"


def run_exec(argv: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run a probe or hook command; (exit code, output). Timeout kills the group and gives -1."""
    try:
        popen = subprocess.Popen(
            list(argv), env=dict(env), cwd=str(cwd), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    except OSError as e:
        return 126, f"cannot run {argv[0]!r}: {e}"
    try:
        out, _ = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(popen.pid, signal.SIGKILL)
        out, _ = popen.communicate()
        return -1, f"command timed out after {timeout:g}s"
    return popen.returncode, out.decode(errors="replace")[-4096:]


def start_time(pid: int) -> str | None:
    """The kernel start time of a process (field 22 of /proc/pid/stat), to detect pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _session_members(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6: session id
            pids.append(int(entry))
    return pids


def kill_leftovers(root: Path) -> int:
    """Kill the process sessions recorded in pidfiles under root/pods; return how many pidfiles hit."""
    hits = 0
    for pidfile in root.glob("pods/*/run/*.pid"):
        try:
            pid_s, _, started = pidfile.read_text().strip().partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            pidfile.unlink(missing_ok=True)
            continue
        current = start_time(pid)
        if current is not None and started and current != started:
            pidfile.unlink(missing_ok=True)  # pid reused by something else
            continue
        members = _session_members(pid)
        for p in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if members:
            hits += 1
            log.warning("killed %d leftover process(es) of %s", len(members), pidfile)
        pidfile.unlink(missing_ok=True)
    return hits
