"""The pod worker: one thread per pod, from sandbox setup to the final delete."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from zstack_devcluster.kubelet import runtime, status, volumes
from zstack_devcluster.kubelet.api import pod_path
from zstack_devcluster.kubelet.container import Container
from zstack_devcluster.kubelet.context import Services, host_env
from zstack_devcluster.kubelet.envvars import HOST_IP, ConfigError, build_env
from zstack_devcluster.kubelet.identity import PodIdentity
from zstack_devcluster.kubelet.ipam import IPExhausted
from zstack_devcluster.kubelet.paths import PodPaths
from zstack_kube.errors import ApiError
from zstack_kube.times import now, parse_time

log = logging.getLogger(__name__)

TICK = 1.0  # longest sleep between two looks at the pod
FORCED_GRACE = 2.0  # grace for pods that vanished from the API without a graceful delete
TERMINAL = ("Succeeded", "Failed")


class PodWorker:
    """Runs one pod's containers and reports its status."""

    def __init__(self, svc: Services, pod: dict[str, Any], on_exit: Any = None) -> None:
        self.svc = svc
        self._pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.paths = PodPaths.for_pod(svc.settings.root, meta["namespace"], meta["name"], self.uid)
        self.identity = PodIdentity(svc.api, svc.cluster, pod, self.paths)
        self.writer = status.StatusWriter(svc.api, pod)
        self.backoff_initial = svc.settings.backoff_initial
        self.backoff_max = svc.settings.backoff_max
        self.pod_ip = ""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._gone = False
        self._shutdown = False
        self._on_exit = on_exit
        st = pod.get("status") or {}
        self.start_time: str = st.get("startTime") or now()
        self.terminal = st.get("phase") in TERMINAL
        prev = {s["name"]: s for s in st.get("containerStatuses") or []}
        prev_init = {s["name"]: s for s in st.get("initContainerStatuses") or []}
        spec = pod["spec"]
        self.init = [Container(self, c, init=True, previous=prev_init.get(c["name"]))
                     for c in spec.get("initContainers") or []]
        self.main = [Container(self, c, previous=prev.get(c["name"])) for c in spec.get("containers") or []]
        self.init_done = not self.init
        self.sandbox_ready = False
        self.sandbox_error = ""
        self._next_sandbox = 0.0
        self._thread = threading.Thread(target=self._main, name=f"pod-{self.key}", daemon=True)

    # ---- PodContext for containers ------------------------------------------------------------

    @property
    def pod(self) -> dict[str, Any]:
        with self._lock:
            return self._pod

    def prepare(self, spec: dict[str, Any]) -> tuple[dict[str, str], Path]:
        pod = self.pod
        croot = self.paths.container_root(spec["name"])
        meta = pod["metadata"]
        base = host_env()
        base.update(
            HOSTNAME=pod["spec"].get("hostname") or meta["name"],
            KUBECONFIG=str(self.identity.kubeconfig),
            POD_ROOT=str(croot),
            ZSTACK_POD_ROOT=str(croot),
        )
        env = build_env(pod, spec, self.pod_ip, self.svc.lookup_data, base, self.svc.allocatable)
        volumes.link_mounts(self.svc.settings.root, self.paths, pod, spec, env)
        return env, croot

    def log_path(self, name: str) -> Path:
        return self.paths.log(name)

    def pidfile(self, name: str) -> Path:
        return self.paths.pidfile(name)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.svc.events.pod_event(self.pod, kind, reason, message)

    def wake(self) -> None:
        self._wake.set()

    def grace_seconds(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    # ---- control from the kubelet -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod object arrived."""
        with self._lock:
            self._pod = pod
        self._wake.set()

    def gone(self) -> None:
        """The pod object no longer exists in the API."""
        self._gone = True
        self._wake.set()

    def shutdown(self) -> None:
        """The kubelet stops: stop the containers, leave the API object alone."""
        self._shutdown = True
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def container(self, name: str) -> Container | None:
        """A container (regular or init) by name."""
        return next((c for c in (*self.main, *self.init) if c.name == name), None)

    # ---- the loop -----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._run()
        except Exception as e:
            log.exception("pod worker %s crashed; killing its containers", self.key)
            self._stop_all(time.time() + FORCED_GRACE, pre_stop=False)
            self._fail_after_crash(e)
        finally:
            if not self._shutdown:
                self.svc.ipam.release(self.uid)
            if self._on_exit:
                self._on_exit(self)

    def _fail_after_crash(self, err: Exception) -> None:
        """Report the pod Failed (not Ready): the kubelet ignores it from now on."""
        if self._shutdown or self._gone:
            return
        self.terminal = True
        msg = f"the process kubelet's pod worker crashed: {type(err).__name__}: {err}"
        try:
            self._publish(force_phase="Failed", reason="KubeletPodWorkerCrashed", message=msg)
        except Exception:
            log.exception("pod %s: publishing the full Failed status failed; publishing a minimal one", self.key)
            own = [{"type": t, "status": "False", "reason": "KubeletPodWorkerCrashed"}
                   for t in ("ContainersReady", "Ready")]
            try:
                self.writer.publish({"phase": "Failed", "reason": "KubeletPodWorkerCrashed", "message": msg,
                                     "conditions": self.writer.with_times(self.pod, own)})
            except Exception:
                log.exception("pod %s: cannot publish the Failed status", self.key)

    def _run(self) -> None:
        self.paths.create()
        while True:
            if self._shutdown:
                self._stop_all(time.time() + min(self.grace_seconds(), self.svc.settings.shutdown_grace), True)
                return
            if self._gone:
                self._stop_all(time.time() + FORCED_GRACE, pre_stop=False)
                self.paths.cleanup()
                return
            pod = self.pod
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate()
                return
            if not self.terminal and not self.pod_ip:
                self._allocate_ip()
            if not self.terminal and self.pod_ip:
                self._sandbox()
                if self.sandbox_ready:
                    self._step()
            self._publish()
            self._wake.wait(self._sleep_time())
            self._wake.clear()

    def _allocate_ip(self) -> None:
        if self.pod["spec"].get("hostNetwork"):
            self.pod_ip = HOST_IP
            return
        preferred = (self.pod.get("status") or {}).get("podIP")
        try:
            self.pod_ip = self.svc.ipam.allocate(self.uid, preferred)
        except IPExhausted as e:
            if str(e) != self.sandbox_error:
                self.event("Warning", "FailedCreatePodSandBox", str(e))
            self.sandbox_error = str(e)
            for c in (*self.init, *self.main):
                c.waiting = ("ContainerCreating", str(e))

    def _sleep_time(self) -> float:
        t = TICK
        for c in (*self.init, *self.main):
            if not c.done and c.proc is None and c.next_start:
                t = min(t, max(c.next_start - time.time(), 0.05))
        return t

    def _sandbox(self) -> None:
        """Set up (and periodically refresh) identity and volumes."""
        due = time.time() >= self._next_sandbox or self.identity.refresh_due()
        if not due:
            return
        try:
            self.identity.write()
            volumes.setup_volumes(
                self.svc.settings.root, self.paths, self.pod, self.pod_ip, self.svc.lookup_object, self.identity.token
            )
        except (volumes.VolumeError, ConfigError) as e:
            retry = 2.0
            if not self.sandbox_ready:
                if str(e) != self.sandbox_error:
                    self.event("Warning", "FailedMount", str(e))
                self.sandbox_error = str(e)
                for c in (*self.init, *self.main):
                    if c.proc is None and not c.done:
                        c.waiting = ("ContainerCreating", str(e))
            else:
                log.warning("pod %s: refreshing volumes failed: %s", self.key, e)
                retry = 10.0
            self._next_sandbox = time.time() + retry
            return
        if not self.sandbox_ready:
            for c in (*self.init, *self.main):
                if c.waiting[0] == "ContainerCreating":
                    c.waiting = (c.waiting[0], "")
        self.sandbox_ready = True
        self.sandbox_error = ""
        self._next_sandbox = time.time() + self.svc.settings.volume_resync

    def _policy(self) -> str:
        return self.pod["spec"].get("restartPolicy") or "Always"

    def _step(self) -> None:
        limit = self.pod["spec"].get("activeDeadlineSeconds")
        if limit is not None and time.time() - parse_time(self.start_time) >= float(limit):
            msg = f"Pod was active on the node longer than the specified deadline ({limit}s)"
            self.event("Normal", "DeadlineExceeded", msg)
            self._become_terminal("Failed", "DeadlineExceeded", msg)
            return
        policy = self._policy()
        init_policy = "Never" if policy == "Never" else "OnFailure"
        if not self.init_done:
            for c in self.init:
                if c.sidecar:
                    c.step("Always")
                    if not c.started:
                        break
                    continue
                if c.succeeded:
                    continue
                c.step(init_policy)
                if not c.succeeded:
                    break
            else:
                self.init_done = True
        if self.init_done:
            for c in self.init:
                if c.sidecar:
                    c.step("Always")
            for c in self.main:
                c.step(policy)
        ph = status.phase(policy, self.init, self.main, self.init_done)
        if ph in TERMINAL:
            self._become_terminal(ph)

    def _become_terminal(self, ph: str, reason: str = "", message: str = "") -> None:
        log.info("pod %s finished: %s %s", self.key, ph, reason)
        self._stop_all(time.time() + self.grace_seconds(), pre_stop=True)
        self.terminal = True
        self._publish(force_phase=ph, reason=reason, message=message)
        self.svc.ipam.release(self.uid)

    def _publish(
        self, force_phase: str | None = None, terminating: bool = False, reason: str = "", message: str = ""
    ) -> None:
        pod = self.pod
        policy = self._policy()
        if force_phase:
            ph = force_phase
        elif self.terminal and not terminating:
            return  # a finished pod's status is final
        else:
            ph = status.phase(policy, self.init, self.main, self.init_done, terminal=terminating)
        own = status.conditions(pod, ph, self.sandbox_ready, self.init, self.main, self.init_done)
        st: dict[str, Any] = {
            "phase": ph,
            "conditions": self.writer.with_times(pod, own),
            **status.host_fields(self.pod_ip, self.start_time),
            "containerStatuses": status.container_statuses(self.main, self.init_done),
        }
        if self.init:
            st["initContainerStatuses"] = [c.status() for c in self.init]
        if reason:
            st.update(reason=reason, message=message)
        if pod["metadata"].get("generation"):
            st["observedGeneration"] = pod["metadata"]["generation"]
        if not self.writer.publish(st):
            self._gone = True

    # ---- stopping -----------------------------------------------------------------------------

    def _stop_all(self, deadline: float, pre_stop: bool) -> None:
        """Stop main containers in parallel, then sidecars in reverse order; SIGKILL at deadline.

        A second delete with a shorter grace period (or the object vanishing) kills at once.
        """
        grace_now = self._deletion_grace()
        groups = [[*self.main, *(c for c in self.init if not c.sidecar)]]
        groups += [[c] for c in reversed(self.init) if c.sidecar]
        for group in groups:
            threads = [
                threading.Thread(target=c.terminate, args=(deadline, pre_stop), daemon=True) for c in group
            ]
            for t in threads:
                t.start()
            killed = False
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
                shortened = grace_now is not None and (self._deletion_grace() or 0) < grace_now
                if not killed and (self._gone or shortened or time.time() > deadline + 1):
                    self._kill_now(group)
                    killed = True
                if killed and time.time() > deadline + 5:
                    log.warning("pod %s: a hook is still running after its grace period; moving on", self.key)
                    break
            if pre_stop:
                deadline = max(deadline, time.time() + 2.0)

    def _deletion_grace(self) -> float | None:
        meta = self.pod["metadata"]
        if not meta.get("deletionTimestamp") or meta.get("deletionGracePeriodSeconds") is None:
            return None
        return float(meta["deletionGracePeriodSeconds"])

    @staticmethod
    def _kill_now(group: list[Container]) -> None:
        for c in group:
            if c.proc is not None and not c.proc.exited():
                runtime.signal_group(c.proc.pid, signal.SIGKILL)

    def _terminate(self) -> None:
        """Graceful deletion: preStop, SIGTERM, SIGKILL at the grace deadline, final status, delete."""
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        grace = self.grace_seconds() if grace is None else float(grace)
        log.info("pod %s: deleting, grace %.0fs", self.key, grace)
        if not self.terminal:
            self.event("Normal", "Killing", "Stopping pod containers")
            self._stop_all(time.time() + grace, pre_stop=True)
            self._publish(terminating=True)
        try:
            self.svc.api.delete(
                pod_path(meta["namespace"], meta["name"]),
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": self.uid}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("pod %s: final delete failed: %s", self.key, e)
        self.paths.cleanup()
