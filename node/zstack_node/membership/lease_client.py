"""The client of the Lease API: this MN's coordination.k8s.io/v1 Lease (acquire, renew, release), and a
watch of its cluster's Leases.

Every call is synchronous (zstack_kube's Client) with a timeout, so an API-server outage never hangs the
node: `LeaseApi` runs in worker threads (asyncio.to_thread), `LeaseWatcher` in a thread of its own that
hands events to the event loop. Lease bodies are plain dicts, exactly as the API server returns them.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zstack_kube.backoff import Backoff
from zstack_kube.client import Client
from zstack_kube.errors import describe, status_of
from zstack_kube.paths import api_path
from zstack_kube.times import micro_time

log = logging.getLogger(__name__)

CLUSTER_LABEL = "zstack.io/cluster"
GROUP_VERSION = "coordination.k8s.io/v1"


class Outcome(enum.Enum):
    OK = "ok"
    LOST = "lost"  # deleted, or held by someone else: fence
    FAILED = "failed"  # the API server did not answer usefully: Leases decide nothing for now


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""
    renew_time: str | None = None  # on OK: the renewTime the API server stored, to find it on the watch


@dataclass(frozen=True)
class LeaseEvent:
    """One watch event (ADDED, MODIFIED, DELETED), a fresh list (SYNCED, with `items`), or the watch
    failing (BROKEN, with `reason`). All travel through one queue, so they are applied in the order they
    happened: a list taken before a break can never mark the watch synced after it."""

    kind: str
    name: str = ""
    holder: str | None = None
    renew_time: str | None = None
    duration: float = 0.0
    items: tuple[tuple[str, str | None, str | None, float], ...] = ()
    reason: str = ""


def facts(obj: dict[str, Any]) -> tuple[str, str | None, str | None, float]:
    """(name, holder, renewTime, duration) of a Lease dict."""
    spec = obj.get("spec") or {}
    return (obj["metadata"]["name"], spec.get("holderIdentity") or None, spec.get("renewTime"),
            float(spec.get("leaseDurationSeconds") or 0))


def _owner_uids(obj: dict[str, Any]) -> set[str]:
    return {o.get("uid") for o in obj.get("metadata", {}).get("ownerReferences") or []}


def _lease_client(factory: Callable[[], Any], timeout: float) -> Client:
    """A Client that logs in again after a 401 (ServiceAccount tokens rotate)."""
    return Client(factory(), timeout=timeout, relogin=factory)


class LeaseApi:
    """This MN's own Lease: name = pod name, holderIdentity = MN UUID, owned by its Pod."""

    def __init__(self, client_factory: Callable[[], Any], namespace: str, name: str, cluster: str,
                 duration: float, pod_name: str | None, timeout: float) -> None:
        self._factory = client_factory
        self.namespace, self.name, self.cluster, self.pod_name = namespace, name, cluster, pod_name
        self.duration = max(1, math.ceil(duration))  # leaseDurationSeconds is an integer
        self.timeout = timeout
        self._api: Client | None = None
        self._lease: dict[str, Any] | None = None  # the last version I wrote or read
        self._owner_warned = False

    # ---- plumbing --------------------------------------------------------------------------

    @property
    def _client(self) -> Client:
        if self._api is None:  # logged in at the first call, so that a failed login is a FAILED result
            self._api = _lease_client(self._factory, self.timeout)
        return self._api

    def _path(self, name: str = "") -> str:
        return api_path(GROUP_VERSION, "leases", self.namespace, name)

    def _read(self) -> dict[str, Any]:
        return self._client.get(self._path(self.name))

    def _owner_references(self) -> list[dict[str, Any]]:
        """A reference to my Pod, so that the Lease goes when the Pod goes."""
        if not self.pod_name:
            return []
        try:
            uid = self._client.get(api_path("v1", "pods", self.namespace, self.pod_name))["metadata"]["uid"]
        except Exception as exc:
            if status_of(exc) is None:
                raise  # the API server is unreachable: the caller reports a failure
            if not self._owner_warned:
                log.warning("cannot read my Pod %s/%s (%s): my Lease gets no ownerReference",
                            self.namespace, self.pod_name, describe(exc))
                self._owner_warned = True
            return []
        return [{"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": uid}]

    def _body(self, holder: str, base: dict[str, Any] | None, owners: list[dict[str, Any]]) -> dict[str, Any]:
        now = micro_time()
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "labels": {**((base or {}).get("metadata", {}).get("labels") or {}),
                                               CLUSTER_LABEL: self.cluster}}
        if owners:
            metadata["ownerReferences"] = owners
        spec = dict((base or {}).get("spec") or {})
        if base is not None:
            metadata["resourceVersion"] = base["metadata"]["resourceVersion"]
            if spec.get("holderIdentity") != holder:
                spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec.update(holderIdentity=holder, leaseDurationSeconds=self.duration, acquireTime=now, renewTime=now)
        return {"apiVersion": GROUP_VERSION, "kind": "Lease", "metadata": metadata, "spec": spec}

    def _delete(self, current: dict[str, Any]) -> None:
        """Delete exactly the version `current` of my Lease (a 409 when it changed meanwhile)."""
        self._client.delete(self._path(self.name), {
            "apiVersion": "v1", "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": current["metadata"]["resourceVersion"]}})

    def _ok(self) -> Result:
        return Result(Outcome.OK, renew_time=((self._lease or {}).get("spec") or {}).get("renewTime"))

    # ---- operations ------------------------------------------------------------------------

    def acquire(self, holder: str) -> Result:
        """Create my Lease, or take it over (it is my pod's, whoever held it) with `holder`."""
        try:
            for _ in range(3):
                try:
                    current = self._read()
                except Exception as exc:
                    if status_of(exc) != 404:
                        raise
                    current = None
                owners = self._owner_references()
                try:
                    if current is not None and owners and _owner_uids(current) != {o["uid"] for o in owners}:
                        # A Lease of an earlier Pod of this name, which the garbage collector may be deleting
                        # right now: replace the object instead of taking it over.
                        self._delete(current)
                        current = None
                    body = self._body(holder, current, owners)
                    if current is None:
                        self._lease = self._client.create(self._path(), body)
                    else:
                        self._lease = self._client.replace(self._path(self.name), body)
                    return self._ok()
                except Exception as exc:
                    if status_of(exc) not in (404, 409):
                        raise
            return Result(Outcome.FAILED, "the Lease kept changing under me")
        except Exception as exc:
            return Result(Outcome.FAILED, describe(exc))

    def renew(self, holder: str) -> Result:
        """Set renewTime. LOST when the Lease is gone or someone else holds it; FAILED on an outage."""
        try:
            for _ in range(2):
                current = self._lease
                if current is None or (current.get("spec") or {}).get("holderIdentity") != holder:
                    return Result(Outcome.LOST, f"my Lease {self.name} is held by "
                                                f"{(current or {}).get('spec', {}).get('holderIdentity')}")
                body = copy.deepcopy(current)
                body["spec"]["renewTime"] = micro_time()
                try:
                    self._lease = self._client.replace(self._path(self.name), body)
                    return self._ok()
                except Exception as exc:
                    if status_of(exc) == 404:
                        return Result(Outcome.LOST, f"my Lease {self.name} was deleted")
                    if status_of(exc) != 409:
                        raise
                try:  # a conflict: somebody wrote it. Still mine (say, a label added)? Then try once more.
                    self._lease = self._read()
                except Exception as exc:
                    if status_of(exc) == 404:
                        return Result(Outcome.LOST, f"my Lease {self.name} was deleted")
                    raise
            return Result(Outcome.FAILED, "conflicting writes to my Lease")
        except Exception as exc:
            return Result(Outcome.FAILED, describe(exc))

    def release(self, holder: str) -> Result:
        """Graceful leave: delete my Lease if I still hold it (a resourceVersion precondition guards it)."""
        try:
            current = self._read()
            if current is None or (current.get("spec") or {}).get("holderIdentity") != holder:
                return Result(Outcome.LOST, "not mine any more")
            self._delete(current)
            self._lease = None
            return Result(Outcome.OK)
        except Exception as exc:
            if status_of(exc) == 404:
                return Result(Outcome.OK)
            return Result(Outcome.FAILED, describe(exc))


class LeaseWatcher(threading.Thread):
    """List+watch of the cluster's Leases in a thread; resumes from resourceVersion, relists on 410.

    `emit` is called from this thread (the caller hands the event to its loop); `broken` when the
    watch fails, so that the caller stops trusting Leases until the next SYNCED.
    """

    def __init__(self, client_factory: Callable[[], Any], namespace: str, cluster: str, timeout: float,
                 emit: Callable[[LeaseEvent], None], broken: Callable[[str], None]) -> None:
        super().__init__(name="lease-watch", daemon=True)
        self._factory, self.namespace, self.timeout = client_factory, namespace, timeout
        self.path = api_path(GROUP_VERSION, "leases", namespace)
        self.selector = f"{CLUSTER_LABEL}={cluster}"
        self._emit, self._broken = emit, broken
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        client: Client | None = None
        version: str | None = None
        backoff = Backoff(0.2, 2.0)
        while not self._stop_event.is_set():
            try:
                if client is None:  # a 401 logs in again inside the Client
                    client = _lease_client(self._factory, self.timeout)
                if version is None:
                    version = self._list(client)
                version = self._watch(client, version)
                backoff.reset()
            except Exception as exc:
                if status_of(exc) == 410:
                    version = None  # too old: relist
                    continue
                self._broken(describe(exc))
                version = None  # what happened while I was away is known only from a fresh list
                self._stop_event.wait(backoff.next())

    def _list(self, client: Client) -> str:
        body = client.get(self.path, labelSelector=self.selector)
        self._emit(LeaseEvent("SYNCED", items=tuple(facts(obj) for obj in body.get("items") or [])))
        return body["metadata"]["resourceVersion"]

    def _watch(self, client: Client, version: str) -> str | None:
        """Stream events until the server ends the watch; the version to resume from (None: relist)."""
        # Bookmarks come about once a minute; a silent, half-dead connection ends at the read timeout.
        events = client.watch(self.path, resource_version=version, timeout_seconds=60,
                              connect_timeout=self.timeout, labelSelector=self.selector)
        try:
            for event in events:
                if self._stop_event.is_set():
                    return None
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    name, holder, renew_time, duration = facts(obj)
                    self._emit(LeaseEvent(kind, name, holder, renew_time, duration))
        finally:
            events.close()
        return version
