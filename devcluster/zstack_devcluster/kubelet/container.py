"""One container of a pod: start, probe, notice exits, restart with back-off, stop."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from zstack_devcluster.kubelet import runtime
from zstack_devcluster.kubelet.envvars import ConfigError, expand
from zstack_devcluster.kubelet.probes import Prober, ProbeSpec, Target, run_handler
from zstack_devcluster.kubelet.volumes import VolumeError
from zstack_kube.times import to_rfc3339

log = logging.getLogger(__name__)

RETRY_CONFIG = 5.0  # seconds between attempts while a container cannot be created
MIN_GRACE_AFTER_PRESTOP = 2.0  # like the kubelet's minimumGracePeriodInSeconds
RESET_BACKOFF_AFTER = 600.0  # a run this long resets the back-off


class PodContext(Protocol):
    """What a container needs from its pod worker."""

    pod_ip: str
    backoff_initial: float
    backoff_max: float

    @property
    def pod(self) -> dict[str, Any]: ...

    def prepare(self, spec: dict[str, Any]) -> tuple[dict[str, str], Path]:
        """The container's environment and root directory (mounts linked)."""
        ...

    def log_path(self, name: str) -> Path: ...

    def pidfile(self, name: str) -> Path: ...

    def event(self, kind: str, reason: str, message: str) -> None: ...

    def wake(self) -> None: ...

    def grace_seconds(self) -> float: ...


class Container:
    """State machine of one container (a regular, init or sidecar container)."""

    def __init__(
        self, ctx: PodContext, spec: dict[str, Any], *, init: bool = False, previous: dict[str, Any] | None = None
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.sidecar = init and spec.get("restartPolicy") == "Always"
        self.proc: runtime.Process | None = None
        self.env: dict[str, str] = {}
        self.root: Path | None = None
        prev = previous or {}
        self.restart_count = int(prev.get("restartCount", 0))
        # A container that ran under an earlier kubelet counts its next start as a restart.
        self._ever_started = bool(
            (prev.get("lastState") or {}).get("terminated") or set(prev.get("state") or {}) & {"running", "terminated"}
        )
        self.waiting: tuple[str, str] = ("PodInitializing" if init else "ContainerCreating", "")
        self.terminated: dict[str, Any] | None = None  # final state: will not run again
        self.last_termination: dict[str, Any] | None = None
        self.next_start = 0.0
        self._backoff = 0.0
        self.probers: dict[str, Prober] = {}
        self._killing: threading.Thread | None = None
        self._kill_message = ""
        self._kill_probe = "liveness"
        # (start, end) byte offsets of each run in the log file, for `kubectl logs [--previous]`
        self.runs: list[tuple[int, int | None]] = []

    # ---- derived state -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.popen.returncode is None

    @property
    def done(self) -> bool:
        """Terminated for good (no restart will follow)."""
        return self.terminated is not None

    @property
    def succeeded(self) -> bool:
        return self.terminated is not None and self.terminated["exitCode"] == 0

    @property
    def started(self) -> bool:
        """Running and past its startupProbe (if any)."""
        if not self.running:
            return False
        p = self.probers.get("startup")
        return p is None or p.result

    @property
    def ready(self) -> bool:
        if self.init and not self.sidecar:
            return self.succeeded
        if not self.started:
            return False
        p = self.probers.get("readiness")
        return p is None or p.result

    def status(self) -> dict[str, Any]:
        """This container's entry in containerStatuses / initContainerStatuses."""
        st: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image") or "",
            "imageID": "",
            "restartCount": self.restart_count,
            "ready": self.ready,
            "started": self.started,
        }
        if self.running and self.proc:
            st["state"] = {"running": {"startedAt": to_rfc3339(self.proc.started_at)}}
            st["containerID"] = _cid(self.proc)
        elif self.terminated:
            st["state"] = {"terminated": self.terminated}
            st["containerID"] = self.terminated["containerID"]
        else:
            reason, message = self.waiting
            st["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        st["lastState"] = {"terminated": self.last_termination} if self.last_termination else {}
        return st

    # ---- driving ------------------------------------------------------------------------------

    def step(self, policy: str, may_start: bool = True) -> None:
        """Advance: notice probe failures and exits, (re)start when due. Never blocks long."""
        if self.proc is not None:
            if self._killing is None and self._probe_failed():
                self._kill_async()
            rc = self.proc.poll()
            if rc is None:
                return
            self._exited(rc, policy)
        if self.done or not may_start:
            return
        if time.time() >= self.next_start:
            self._start()

    def _probe_failed(self) -> bool:
        for kind in ("startup", "liveness"):
            p = self.probers.get(kind)
            if p and p.failed:
                self._kill_message = f"Container {self.name} failed {kind} probe, will be restarted"
                self._kill_probe = kind
                return True
        return False

    def _kill_async(self) -> None:
        proc = self.proc
        assert proc is not None
        self.ctx.event("Normal", "Killing", self._kill_message)
        runtime.log_line(self.ctx.log_path(self.name), self._kill_message)
        probe = self.spec.get(f"{self._kill_probe}Probe") or {}
        grace = float(probe.get("terminationGracePeriodSeconds", self.ctx.grace_seconds()))

        def kill() -> None:
            runtime.stop(proc, grace)
            self.ctx.wake()

        self._killing = threading.Thread(target=kill, name=f"kill-{self.name}", daemon=True)
        self._killing.start()

    def _exited(self, rc: int, policy: str) -> None:
        proc = self.proc
        assert proc is not None
        self._stop_probers()
        self.proc = None
        self._killing = None
        code, sig, reason = runtime.exit_details(rc)
        finished = time.time()
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": to_rfc3339(proc.started_at),
            "finishedAt": to_rfc3339(finished),
            "containerID": _cid(proc),
        }
        if sig:
            term["signal"] = sig
        logf = self.ctx.log_path(self.name)
        if self.runs and self.runs[-1][1] is None:
            self.runs[-1] = (self.runs[-1][0], logf.stat().st_size)
        runtime.log_line(logf, f"container {self.name} (pid {proc.pid}) exited: code {code}")
        restart = policy == "Always" or (policy == "OnFailure" and code != 0)
        if not restart:
            self.terminated = term
            return
        self.last_termination = term
        if finished - proc.started_at > RESET_BACKOFF_AFTER:
            self._backoff = 0.0
        delay = self._backoff
        self._backoff = self.ctx.backoff_initial if not delay else min(delay * 2, self.ctx.backoff_max)
        self.next_start = finished + delay
        if delay:
            pod = self.ctx.pod["metadata"]
            msg = f"back-off {delay:g}s restarting failed container={self.name} pod={pod['name']}_{pod['namespace']}"
            self.waiting = ("CrashLoopBackOff", msg)
            self.ctx.event("Warning", "BackOff", "Back-off restarting failed container " + self.name)

    def _start(self) -> None:
        command = list(self.spec.get("command") or [])
        if not command:
            image = self.spec.get("image") or "<none>"
            self._wait(
                "NoCommand",
                f"container {self.name!r} has no command: the process kubelet ignores images "
                f"(image {image}), so the pod spec must set command",
                60,
            )
            return
        try:
            env, root = self.ctx.prepare(self.spec)
        except (ConfigError, VolumeError) as e:
            self._wait("CreateContainerConfigError", str(e), RETRY_CONFIG)
            return
        unexpanded = command + list(self.spec.get("args") or [])  # what logs and messages show: $(VAR) may be a secret
        argv = [expand(a, env) for a in unexpanded]
        exe = runtime.resolve(argv[0], env.get("PATH"), root)
        if exe is None:
            self._wait(
                "CommandNotFound",
                f"executable {command[0]!r} of container {self.name!r} not found on the host PATH",
                RETRY_CONFIG * 2,
            )
            return
        cwd = root
        if self.spec.get("workingDir"):
            cwd = root / self.spec["workingDir"].lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        logf = self.ctx.log_path(self.name)
        runtime.log_line(logf, f"starting container {self.name}: {unexpanded}")
        offset = logf.stat().st_size
        try:
            proc = runtime.start(exe, argv, env, cwd, logf, self.ctx.pidfile(self.name))
        except OSError as e:
            runtime.log_line(logf, f"cannot start: {e}")
            self._wait("RunContainerError", f"cannot start {command[0]!r}: {e}", max(self._backoff, RETRY_CONFIG))
            return
        runtime.log_line(logf, f"container {self.name} started, pid {proc.pid}")
        self.runs.append((offset, None))
        if self._ever_started:
            self.restart_count += 1
        self._ever_started = True
        self.proc, self.env, self.root = proc, env, root
        self.waiting = ("ContainerCreating", "")
        self.ctx.event("Normal", "Started", f"Started container {self.name}")
        self._start_probers(proc)
        hook = (self.spec.get("lifecycle") or {}).get("postStart")
        if hook:
            threading.Thread(target=self._post_start, args=(proc, hook), daemon=True).start()

    def _wait(self, reason: str, message: str, retry: float) -> None:
        if self.waiting != (reason, message):
            self.ctx.event("Warning", "Failed", message)
        self.waiting = (reason, message)
        self.next_start = time.time() + retry

    def _post_start(self, proc: runtime.Process, hook: dict[str, Any]) -> None:
        ok, msg = run_handler(hook, self._target(), self.ctx.grace_seconds())
        if not ok and self.proc is proc:
            self._kill_message = f"PostStartHook failed: {msg}"
            self.ctx.event("Warning", "FailedPostStartHook", self._kill_message)
            runtime.stop(proc, self.ctx.grace_seconds())
            self.ctx.wake()

    def _target(self) -> Target:
        return Target.for_container(self.spec, self.ctx.pod_ip, self.env, self.root or Path("/"))

    def _start_probers(self, proc: runtime.Process) -> None:
        self.probers = {}
        for kind in ("startup", "readiness", "liveness"):
            probe = self.spec.get(f"{kind}Probe")
            if not probe or (self.init and not self.sidecar):
                continue
            p = Prober(
                kind=kind,
                spec=ProbeSpec.parse(probe),
                target=self._target(),
                container_started_at=proc.started_at,
                started=lambda: self.started,
                on_change=self._probe_changed,
            )
            self.probers[kind] = p
            p.start(f"{kind}-{self.ctx.pod['metadata']['name']}-{self.name}")

    def _probe_changed(self, prober: Prober, message: str) -> None:
        if message:
            self.ctx.event("Warning", "Unhealthy", message)
        self.ctx.wake()

    def _stop_probers(self) -> None:
        for p in self.probers.values():
            p.stop()
        self.probers = {}

    # ---- stopping -----------------------------------------------------------------------------

    def terminate(self, deadline: float, pre_stop: bool = True) -> None:
        """Stop for good: preStop hook, SIGTERM, SIGKILL at `deadline` (time.time()). Blocks."""
        proc = self.proc
        for p in self.probers.values():
            if p.kind != "readiness":
                p.stop()
        if proc is None or proc.popen.returncode is not None:
            self._finish_terminate()
            return
        hook = (self.spec.get("lifecycle") or {}).get("preStop")
        logf = self.ctx.log_path(self.name)
        if pre_stop and hook and not proc.exited():
            runtime.log_line(logf, f"running preStop hook of {self.name}")
            ok, msg = run_handler(hook, self._target(), max(deadline - time.time(), 0.1))
            if not ok:
                self.ctx.event("Warning", "FailedPreStopHook", f"PreStopHook failed: {msg}")
                runtime.log_line(logf, f"preStop hook failed: {msg}")
        grace = max(deadline - time.time(), MIN_GRACE_AFTER_PRESTOP if hook and pre_stop else 0)
        runtime.log_line(logf, f"stopping container {self.name} (pid {proc.pid}), grace {grace:.1f}s")
        runtime.stop(proc, grace)
        self._finish_terminate()

    def _finish_terminate(self) -> None:
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is not None:
                self._exited(rc, "Never")
        self._stop_probers()
        if self.terminated is None and self.last_termination is None and not self._ever_started:
            return  # never ran: stays waiting, like the real kubelet reports it
        if self.terminated is None and self.last_termination is not None:
            self.terminated, self.last_termination = self.last_termination, None


def _cid(proc: runtime.Process) -> str:
    return f"process://{proc.pid}-{int(proc.started_at)}"
