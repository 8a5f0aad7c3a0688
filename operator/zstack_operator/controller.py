"""The leader's work: reconcile clusters when kopf reports a change and periodically, and keep status current.

kopf calls `track`/`forget` on every ZStackCluster event, `reconcile` on create, update and resume, and
`poke` when one of a cluster's MN pods changes. One status thread observes each cluster (its StatefulSets,
pods and the MNs' rings) when poked, every `status_interval` while it is not Ready and stable, and every
`idle_status_interval` otherwise (an MN can fence and rejoin without a pod event). It patches status only when
something changed, so MN Lease renewals and steady clusters cause no writes. The same thread re-reconciles each
cluster every `resync_interval` to undo drift.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zstack_kube.errors import ApiError
from zstack_operator import metrics
from zstack_operator.cluster import Cluster
from zstack_operator.events import EventRecorder
from zstack_operator.kubeapi import Kube
from zstack_operator.mn import MN_CLUSTER_ROLE
from zstack_operator.observe import observe
from zstack_operator.reconcile import Outcome, ReconcileError, Stopping, reconcile
from zstack_operator.status import ReconcileState, build_status, same_status

log = logging.getLogger(__name__)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@dataclass
class Tracked:
    """One cluster: its latest object, what its last reconcile left, and the status last written."""

    body: dict[str, Any]
    state: ReconcileState = field(default_factory=ReconcileState)
    written: dict[str, Any] | None = None
    paused: bool | None = None
    notes: list[str] = field(default_factory=list)
    last_reconcile: float = 0.0
    due: float = 0.0  # monotonic time of the next status refresh
    changes: int = 0  # bumped by every change that calls for a refresh, so none is lost during one
    quiet: int = 0  # refreshes in a row that found nothing to write
    ready: bool = False
    reconcile_lock: threading.Lock = field(default_factory=threading.Lock)


class Controller:
    """Reconciles and reports on the ZStackClusters kopf tells it about."""

    def __init__(self, kube: Kube, events: EventRecorder, status_interval: float, resync_interval: float,
                 idle_status_interval: float = 10.0, mn_cluster_role: str = MN_CLUSTER_ROLE) -> None:
        self.kube = kube
        self.mn_cluster_role = mn_cluster_role
        self.events = events
        self.status_interval = status_interval
        self.idle_status_interval = max(idle_status_interval, status_interval)
        self.resync_interval = resync_interval
        self._clusters: dict[tuple[str, str], Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ring")
        self._thread = threading.Thread(target=self._status_loop, name="status", daemon=True)

    # ---- fed by kopf --------------------------------------------------------------------------

    def track(self, body: dict[str, Any]) -> None:
        key = _key(body)
        with self._lock:
            tracked = self._clusters.get(key)
            if tracked is None or tracked.body["metadata"]["uid"] != body["metadata"]["uid"]:
                self._clusters[key] = Tracked(body)
                self._wake.set()
            elif _generation(body) >= _generation(tracked.body):  # never step back to an older spec
                old, tracked.body = tracked.body, body
                if _essence(old) != _essence(body):  # not just a status or bookkeeping write
                    self._changed(tracked)
                    if _generation(body) > (tracked.state.observed_generation or 0) or \
                            Cluster.from_body(body).paused != Cluster.from_body(old).paused:
                        # Reconcile at the next pass even if kopf holds its handler back after a failure.
                        tracked.last_reconcile = 0.0
            metrics.CLUSTERS.set(len(self._clusters))

    def poke(self, namespace: str, name: str) -> None:
        """Something of this cluster changed (an MN pod): refresh its status at the next pass."""
        tracked = self._get(namespace, name)
        if tracked is not None:
            self._changed(tracked)

    def forget(self, body: dict[str, Any]) -> None:
        with self._lock:
            tracked = self._clusters.get(_key(body))
            if tracked is not None and tracked.body["metadata"]["uid"] == body["metadata"]["uid"]:
                del self._clusters[_key(body)]
            metrics.CLUSTERS.set(len(self._clusters))

    def _changed(self, tracked: Tracked) -> None:
        tracked.changes += 1
        tracked.due = 0.0
        self._wake.set()

    def reconcile(self, body: dict[str, Any], trigger: str) -> None:
        """Reconcile one cluster now (unless paused). Raises ReconcileError for kopf to retry, and Stopping
        once this replica no longer leads."""
        if self._stop.is_set():
            raise Stopping
        self.track(body)
        tracked = self._get(*_key(body))
        if tracked is not None:
            self._reconcile(tracked, trigger)

    def _reconcile(self, tracked: Tracked, trigger: str) -> None:
        with tracked.reconcile_lock:
            if self._stop.is_set():
                raise Stopping
            cluster = Cluster.from_body(tracked.body)  # the newest version seen, not the caller's copy
            tracked.last_reconcile = time.monotonic()
            if self._skip_paused(cluster, tracked):
                return
            started = time.monotonic()
            try:
                outcome = reconcile(self.kube, cluster, self.events, should_stop=self._stop.is_set,
                                    mn_cluster_role=self.mn_cluster_role)
            except ReconcileError as exc:
                self._failed(cluster, tracked, exc)
                raise
            finally:
                metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            tracked.state = ReconcileState(observed_generation=cluster.generation)
            self._warn_once(cluster, tracked, outcome.notes)
            metrics.RECONCILES.labels("ok").inc()
            log.info("reconciled %s/%s (generation %d, %s)%s", cluster.namespace, cluster.name, cluster.generation,
                     trigger, _summary(outcome))
        self._changed(tracked)

    # ---- the status thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """Stop writing at once (leadership lost); safe from any thread."""
        self._stop.set()
        self._wake.set()

    @property
    def alive(self) -> bool:
        """False when the status thread died (it never should: see `_status_loop`)."""
        return self._thread.is_alive() or not self._thread.ident or self._stop.is_set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Halt, then wait for the status thread and every reconcile in flight; True when all finished.

        The caller releases the leader Lease only then, so a successor never writes beside us."""
        self.halt()
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            clusters = list(self._clusters.values())
        drained = not self._thread.is_alive()
        for tracked in clusters:
            if tracked.reconcile_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                tracked.reconcile_lock.release()
            else:
                drained = False
        self._pool.shutdown(wait=False, cancel_futures=True)
        return drained

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.status_interval)
            self._wake.clear()
            with self._lock:
                clusters = list(self._clusters.values())
            for tracked in clusters:
                if self._stop.is_set():
                    return
                try:
                    if time.monotonic() >= tracked.due:
                        changes = tracked.changes
                        tracked.ready = self._refresh(tracked)
                        # Idle once settled, or once nothing changed for a while (a stopped or failing
                        # cluster); MN pod and ZStackCluster events bring it back at once.
                        idle = tracked.ready or tracked.quiet >= 3
                        interval = self.idle_status_interval if idle else self.status_interval
                        tracked.due = 0.0 if tracked.changes != changes else time.monotonic() + interval
                    if time.monotonic() - tracked.last_reconcile >= self.resync_interval:
                        self._resync(tracked)
                except Exception:  # a bug must not stop the status of every other cluster
                    log.exception("status pass of %s/%s failed", *_key(tracked.body))
            metrics.READY_CLUSTERS.set(sum(t.ready for t in clusters))

    def _refresh(self, tracked: Tracked) -> bool:
        """Observe one cluster and write its status if it changed; True when it is Ready and not progressing."""
        with self._lock:  # one snapshot: the status must describe the generation it claims
            body, state = tracked.body, tracked.state
        cluster = Cluster.from_body(body)
        if state.observed_generation is not None:
            state = ReconcileState(min(state.observed_generation, cluster.generation), state.error)
        previous = tracked.written or body.get("status")
        try:
            seen = observe(self.kube, cluster, self._pool)
            status = build_status(cluster, seen, state, previous)
            if same_status(status, previous):
                tracked.quiet += 1
            elif self._stop.is_set():
                return False  # no longer leading: observing took a while, do not write now
            else:
                self.kube.patch_status("ZStackCluster", cluster.namespace, cluster.name, status, uid=cluster.uid)
                metrics.STATUS_UPDATES.inc()
                self._log_ring_change(cluster, previous, status)
                tracked.quiet = 0
            tracked.written = status
        except ApiError as exc:
            if exc.status in (404, 422):  # gone, or replaced by a new object of the same name
                self.forget(body)
            else:
                log.warning("cannot update the status of %s/%s: %s", cluster.namespace, cluster.name, exc)
            return False
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        return (conditions["Ready"] == "True" and conditions["Progressing"] == "False"
                and status["replicas"] == cluster.replicas)  # no terminating pod left either

    def _resync(self, tracked: Tracked) -> None:
        with contextlib.suppress(ReconcileError, Stopping):  # recorded in Degraded; tried again next time
            self._reconcile(tracked, "resync")

    # ---- helpers ------------------------------------------------------------------------------

    def _get(self, namespace: str, name: str) -> Tracked | None:
        with self._lock:
            return self._clusters.get((namespace, name))

    def _warn_once(self, cluster: Cluster, tracked: Tracked, notes: list[str]) -> None:
        """Post a warning Event when its text is new, not at every periodic reconcile."""
        for note in notes:
            if note not in tracked.notes:
                self.events.warning(cluster, "MonitoringUnavailable", note)
        tracked.notes = list(notes)

    def _skip_paused(self, cluster: Cluster, tracked: Tracked) -> bool:
        if cluster.paused:
            metrics.RECONCILES.labels("paused").inc()
            if tracked.paused is not True:
                log.info("reconciliation of %s/%s is paused", cluster.namespace, cluster.name)
                self.events.normal(cluster, "ReconciliationPaused",
                                   "zstack.io/pause-reconciliation is \"true\": children are left as they are")
            tracked.paused = True
            self._wake.set()
            return True
        if tracked.paused:
            log.info("reconciliation of %s/%s resumed", cluster.namespace, cluster.name)
            self.events.normal(cluster, "ReconciliationResumed", "reconciling the children with the spec again")
        tracked.paused = False
        return False

    def _failed(self, cluster: Cluster, tracked: Tracked, exc: ReconcileError) -> None:
        metrics.RECONCILES.labels("error").inc()
        metrics.RECONCILE_ERRORS.labels(exc.kind).inc()
        message = f"could not write {exc}"
        if tracked.state.error != message:
            self.events.warning(cluster, "ReconcileFailed", message)
        log.warning("reconciling %s/%s failed: %s", cluster.namespace, cluster.name, message)
        tracked.state = ReconcileState(tracked.state.observed_generation, message)
        self._wake.set()

    @staticmethod
    def _log_ring_change(cluster: Cluster, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        old = ((before or {}).get("ring") or {}).get("summary")
        new = after["ring"]["summary"]
        if old != new:
            log.info("%s/%s: ring %s (ready %d/%d)", cluster.namespace, cluster.name, new, after["readyReplicas"],
                     cluster.replicas)


def _summary(outcome: Outcome) -> str:
    parts = []
    if outcome.created:
        parts.append("created " + ", ".join(outcome.created))
    if outcome.scaled:
        parts.append(f"scaled {outcome.scaled[0]} -> {outcome.scaled[1]}")
    if outcome.deleted:
        parts.append("deleted " + ", ".join(outcome.deleted))
    return ": " + "; ".join(parts) if parts else ""


def _generation(body: dict[str, Any]) -> int:
    return int(body["metadata"].get("generation") or 0)


def _key(body: dict[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def _essence(body: dict[str, Any]) -> tuple[Any, ...]:
    """What a user changes: spec, generation, labels, annotations (kopf's own excluded), deletion."""
    meta = body["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if not k.startswith("operator.zstack.io/") and k != LAST_APPLIED}
    return (meta.get("generation"), meta.get("labels"), annotations, meta.get("deletionTimestamp"), body.get("spec"))
