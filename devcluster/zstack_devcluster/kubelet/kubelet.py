"""The kubelet: node agent, a watch on the node's pods, one worker per pod."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from zstack_devcluster.kubelet.api import cluster_info, connect
from zstack_devcluster.kubelet.context import Services, Settings
from zstack_devcluster.kubelet.events import Recorder
from zstack_devcluster.kubelet.ipam import PodIPAM
from zstack_devcluster.kubelet.node import NodeAgent
from zstack_devcluster.kubelet.podnet import ensure_local
from zstack_devcluster.kubelet.pods import PodWorker
from zstack_devcluster.kubelet.runtime import kill_leftovers
from zstack_devcluster.kubelet.server import KubeletServer, LogNotFound, LogRange
from zstack_kube.errors import ApiError

log = logging.getLogger(__name__)


class Kubelet:
    """Owns the pod workers; `run()` blocks until `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(settings.root, 0o700)  # pod volumes, tokens and logs below may hold secrets
        self.api = connect(settings.kubeconfig)
        self.server = KubeletServer(settings.root / "pki", settings.node_name, self._log_range)
        self.node = NodeAgent(self.api, settings, self.server.port)
        self.svc = Services(
            settings=settings,
            api=self.api,
            cluster=cluster_info(settings.kubeconfig),
            ipam=PodIPAM(settings.pod_cidr or None),
            events=Recorder(self.api, settings.node_name),
            allocatable=dict(self.node.capacity),
        )
        self._workers: dict[str, PodWorker] = {}
        self._finished: dict[str, float] = {}  # uid -> when its worker ended; late events are ignored
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler)."""
        self._stop.set()
        self.node.request_stop()

    def run(self) -> None:
        """Register the node, run pods until stop(), then stop every container."""
        if self.settings.pod_cidr:
            ensure_local(self.settings.pod_cidr)
        n = kill_leftovers(self.settings.root)
        if n:
            log.warning("killed leftovers of %d container(s) from an earlier kubelet", n)
        self.server.start()
        self.node.start()
        watcher = threading.Thread(target=self._watch_loop, name="pod-watch", daemon=True)
        watcher.start()
        log.info("kubelet for node %s running (root %s, pod IPs %s)",
                 self.settings.node_name, self.settings.root, self.svc.ipam.description)
        self._stop.wait()
        self._shutdown()

    # ---- pods -----------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.settings.node_name}"
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._relist(path, selector)
                for ev in self.api.watch(path, resource_version=rv, fieldSelector=selector):
                    if self._stop.is_set():
                        return
                    kind, obj = ev.get("type"), ev.get("object") or {}
                    if kind == "ERROR":
                        log.info("watch ended: %s", obj.get("message"))
                        if obj.get("code") == 410:
                            rv = ""
                        else:
                            self._stop.wait(1)  # do not spin on a failing watch
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if kind in ("ADDED", "MODIFIED"):
                        self._pod_seen(obj)
                    elif kind == "DELETED":
                        self._pod_deleted(obj)
            except ApiError as e:
                if e.status == 410:
                    rv = ""
                    continue
                log.warning("pod watch failed: %s", e)
                self._stop.wait(1)
            except Exception:
                log.exception("pod watch crashed; relisting")
                rv = ""
                self._stop.wait(1)

    def _relist(self, path: str, selector: str) -> str:
        lst = self.api.get(path, fieldSelector=selector)
        pods = lst.get("items") or []
        # Keep the addresses pods already have before anyone allocates a new one.
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            if ip and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self.svc.ipam.allocate(pod["metadata"]["uid"], ip)
        seen = {p["metadata"]["uid"] for p in pods}
        with self._lock:
            missing = [w for uid, w in self._workers.items() if uid not in seen]
        for w in missing:
            w.gone()
        for pod in pods:
            self._pod_seen(pod)
        return lst["metadata"]["resourceVersion"]

    def _pod_seen(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if pod["spec"].get("nodeName") != self.settings.node_name:
            return
        with self._lock:
            w = self._workers.get(uid)
            if w is None:
                if self._stop.is_set() or uid in self._finished:
                    return
                w = PodWorker(self.svc, pod, on_exit=self._worker_done)
                self._workers[uid] = w
                log.info("pod %s/%s (%s) bound here", pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
                w.start()
                return
        w.update(pod)

    def _pod_deleted(self, pod: dict[str, Any]) -> None:
        with self._lock:
            w = self._workers.get(pod["metadata"]["uid"])
        if w:
            w.update(pod)
            w.gone()

    def _worker_done(self, w: PodWorker) -> None:
        with self._lock:
            if self._workers.get(w.uid) is w:
                del self._workers[w.uid]
            t = time.monotonic()
            self._finished = {u: at for u, at in self._finished.items() if t - at < 600}
            self._finished[w.uid] = t

    def _log_range(self, namespace: str, pod: str, container: str, previous: bool) -> LogRange:
        """Which part of which log file `kubectl logs` wants."""
        with self._lock:
            workers = [w for w in self._workers.values() if w.key == f"{namespace}/{pod}"]
        if not workers:
            raise LogNotFound(f'pod "{pod}" in namespace "{namespace}" is not running on this node')
        c = workers[-1].container(container)
        if c is None:
            raise LogNotFound(f'container "{container}" in pod "{pod}" not found')
        runs = list(c.runs)
        if previous:
            if len(runs) < 2:
                raise LogNotFound(f'previous terminated container "{container}" in pod "{pod}" not found')
            start, end = runs[-2]
            return LogRange(c.ctx.log_path(c.name), start, end, lambda: False)
        if not runs:
            reason, msg = c.waiting
            raise LogNotFound(f'container "{container}" in pod "{pod}" is waiting to start: {reason} {msg}'.strip())
        n = len(runs)
        start, end = runs[-1]
        return LogRange(c.ctx.log_path(c.name), start, end, lambda: len(c.runs) == n and c.running)

    # ---- shutdown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("kubelet stopping: stopping all containers")
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.shutdown()
        deadline = time.monotonic() + self.settings.shutdown_grace + 5
        for w in workers:
            w.join(max(deadline - time.monotonic(), 0.1))
        left = [w.key for w in workers if w.alive()]
        if left:
            log.warning("pods still stopping at exit: %s", ", ".join(left))
        self.node.stop()
        self.server.stop()
        self.svc.events.close()
        self.api.close()
        log.info("kubelet stopped")
