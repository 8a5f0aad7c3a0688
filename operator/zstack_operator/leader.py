"""Leader election on a coordination.k8s.io/v1 Lease, for HA operator replicas (like client-go's leaderelection).

One replica leads; the others wait. The rules:

- **Acquire.** Create the Lease if absent. Take it over only when its holder is empty (released) or its
  record has not changed for the lease duration *by my own monotonic clock since I first saw that
  record* (client-go's observedTime): clock skew between replicas never matters.
- **Optimistic writes.** Every write replaces the version that was read (its resourceVersion); a 409
  means another replica wrote first, so I read again.
- **Renew** every `retry_period` while leading. When no renewal succeeded within `renew_deadline` of the
  start of the last successful one, leadership is lost. `is_leader` turns False at that instant even if a
  call is still hanging, and since `renew_deadline < lease_duration` that is before any standby may take
  over: two replicas never both see `is_leader` True.
- **Release** on a graceful stop: the holder is cleared, so a standby takes over at once.

Every call is synchronous (zstack_kube's Client) with a per-call timeout; `run` blocks, so call it in a
thread or through `asyncio.to_thread`. Lease bodies are plain dicts, exactly as the API server returns them.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from zstack_kube.client import Client
from zstack_kube.errors import describe, status_of
from zstack_kube.login import without_retries
from zstack_kube.paths import api_path
from zstack_kube.times import micro_time

log = logging.getLogger(__name__)

GROUP_VERSION = "coordination.k8s.io/v1"
DEFAULT_NAME = "zstack-operator"
RECORD_FIELDS = ("holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime", "leaseTransitions")


class _Outcome(enum.Enum):
    HELD = "held"  # I hold the Lease now (created, taken over or renewed)
    OTHER = "other"  # someone else holds it and their record is not expired
    FAILED = "failed"  # no answer, an error, or a conflicting write: try again later


def default_identity() -> str:
    """This process's identity: the hostname (the pod name in a cluster) plus a short random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _why(exc: BaseException) -> str:
    """`describe(exc)`, cut to fit a log line."""
    return describe(exc)[:400]


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class LeaderElector:
    """Elects one leader among the replicas sharing the Lease `namespace`/`name`."""

    def __init__(self, api_client: Any, namespace: str, name: str = DEFAULT_NAME, identity: str | None = None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 release_on_cancel: bool = True) -> None:
        """`api_client` is a kubernetes ApiClient; the elector talks through a copy of it without urllib3's
        retries (its loop is the retry, and a hung call must end by the renew deadline).
        `release_on_cancel=False` keeps the Lease on a graceful stop (the standby then waits for it to
        expire), as a crashed process would."""
        for arg, value in (("namespace", namespace), ("name", name)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{arg} must be a non-empty string, got {value!r}")
        if identity is not None and (not isinstance(identity, str) or not identity):
            raise ValueError(f"identity must be a non-empty string, got {identity!r}")
        self.lease_duration = _positive("lease_duration", lease_duration)
        self.renew_deadline = _positive("renew_deadline", renew_deadline)
        self.retry_period = _positive("retry_period", retry_period)
        if self.renew_deadline >= self.lease_duration:
            raise ValueError(f"renew_deadline ({renew_deadline}) must be less than lease_duration ({lease_duration})")
        if self.retry_period >= self.renew_deadline:
            raise ValueError(f"retry_period ({retry_period}) must be less than renew_deadline ({renew_deadline})")
        self._client = Client(without_retries(api_client))
        self._path = api_path(GROUP_VERSION, "leases", namespace, name)
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self.release_on_cancel = release_on_cancel
        self.call_timeout = self.renew_deadline / 2  # two tries fit in one renew deadline
        self._lease: dict[str, Any] | None = None  # the last version I read or wrote
        self._observed: tuple[Any, ...] | None = None  # the record of that version...
        self._observed_at = 0.0  # ...and when I first saw it (monotonic)
        self._leading = False
        self._valid_until = 0.0  # monotonic: leadership ends here unless a renewal succeeds first
        self._waiting_for: str | None = None  # the holder last logged as "waiting to lead"
        self._last_error: str | None = None

    # ---- what others may ask ---------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while I lead: a renewal succeeded within the last `renew_deadline` (safe from any thread)."""
        return self._leading and time.monotonic() < self._valid_until

    def holder(self) -> str | None:
        """The holder of the Lease as last seen (None: nobody, or not read yet)."""
        return ((self._lease or {}).get("spec") or {}).get("holderIdentity") or None

    @property
    def lease_ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    # ---- the loop --------------------------------------------------------------------------

    def run(self, on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None],
            stop: threading.Event) -> None:
        """Wait to lead, lead, and wait again after a loss, until `stop` is set; then release the Lease.

        The callbacks run in this thread, once per term, and must return quickly (a slow one delays
        renewals; `is_leader` stays correct meanwhile). `on_stopped_leading` returns before the Lease is
        released, so a successor starts only after it.
        """
        while not stop.is_set():
            if not self._acquire(stop):
                return
            if stop.is_set():  # stopped while my takeover was in flight: hand it back at once
                if self.release_on_cancel:
                    self._release()
                return
            self._leading = True
            log.info("leading as %s", self.identity)
            try:
                on_started_leading()
                lost = self._renew(stop)
            finally:
                self._leading = False
                try:
                    on_stopped_leading()
                finally:
                    if stop.is_set() and self.release_on_cancel:
                        self._release()
            if lost:
                log.warning("lost the Lease %s: %s", self.lease_ref, lost)

    def _acquire(self, stop: threading.Event) -> bool:
        """Try every `retry_period` until I hold the Lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            start = time.monotonic()
            outcome = self._attempt(start + self.call_timeout)
            if outcome is _Outcome.HELD:
                self._valid_until = start + self.renew_deadline
                self._waiting_for = None
                return True
            if outcome is _Outcome.OTHER and self.holder() != self._waiting_for:
                self._waiting_for = self.holder()
                log.info("waiting to lead: %s holds Lease %s", self._waiting_for, self.lease_ref)
            stop.wait(self.retry_period)
        return False

    def _renew(self, stop: threading.Event) -> str | None:
        """Renew every `retry_period` until `stop` (None) or leadership is lost (the reason)."""
        next_at = time.monotonic() + self.retry_period
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            start = time.monotonic()
            if start >= self._valid_until:
                return f"no renewal succeeded within {self.renew_deadline:g} s"
            outcome = self._attempt(min(start + self.call_timeout, self._valid_until))
            if outcome is _Outcome.OTHER:
                return f"{self.holder()} holds it now"
            if outcome is _Outcome.HELD:
                self._valid_until = start + self.renew_deadline
                next_at = start + self.retry_period
            else:  # retry, and wake at the deadline to notice it
                next_at = min(start + self.retry_period, self._valid_until)
        return None

    # ---- one attempt -----------------------------------------------------------------------

    def _attempt(self, deadline: float) -> _Outcome:
        """One try to acquire or renew; errors become FAILED, logged in one line when they change."""
        try:
            outcome = self._try(deadline)
        except Exception as exc:
            status = status_of(exc)
            if status == 409:
                log.debug("Lease %s: a conflicting write, reading it again", self.lease_ref)
                return _Outcome.FAILED
            why = _why(exc)
            kind = why.split(":")[0]  # the same failure again (a timeout's figures vary) is not logged again
            if kind != self._last_error:
                transient = status is None or status >= 500 or status == 429
                log.log(logging.WARNING if transient else logging.ERROR, "Lease %s: %s (retrying every %g s)",
                        self.lease_ref, why, self.retry_period)
                self._last_error = kind
            return _Outcome.FAILED
        if self._last_error is not None:
            log.info("Lease %s: the API server answers again", self.lease_ref)
            self._last_error = None
        return outcome

    def _try(self, deadline: float) -> _Outcome:
        """client-go's tryAcquireOrRenew: read (unless I hold my last version), decide, write."""
        if self._leading and self._lease is not None and self.holder() == self.identity:
            try:  # the common case: my own last version is still current
                self._write(self._lease, deadline)
                return _Outcome.HELD
            except Exception as exc:
                if status_of(exc) != 409:
                    raise
        current = self._read(deadline)
        if current is None:
            self._lease = self._create(self._record(None), deadline)
            self._observe(self._lease)
            return _Outcome.HELD
        self._lease = current
        self._observe(current)
        holder = self.holder()
        if holder and holder != self.identity and not self._expired(current):
            return _Outcome.OTHER
        self._write(current, deadline)
        return _Outcome.HELD

    def _expired(self, lease: dict[str, Any]) -> bool:
        """True when the record I observed has not changed for a lease duration by my clock."""
        promised = float((lease.get("spec") or {}).get("leaseDurationSeconds") or 0)
        return time.monotonic() >= self._observed_at + max(self.lease_duration, promised)

    def _observe(self, lease: dict[str, Any]) -> None:
        spec = lease.get("spec") or {}
        record = tuple(spec.get(key) for key in RECORD_FIELDS)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()

    def _record(self, base: dict[str, Any] | None) -> dict[str, Any]:
        """`base` (or a new Lease) with me as the holder: a takeover counts a transition."""
        lease = copy.deepcopy(base) if base else {
            "apiVersion": GROUP_VERSION, "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace}, "spec": {"leaseTransitions": 0}}
        spec = lease.setdefault("spec", {})
        now = micro_time()
        if base is not None and spec.get("holderIdentity") != self.identity:
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            spec["acquireTime"] = now
        spec.setdefault("acquireTime", now)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=math.ceil(self.lease_duration),
                    renewTime=now)
        return lease

    def _write(self, base: dict[str, Any], deadline: float) -> None:
        """Replace exactly the version `base` (a 409 when someone wrote since) with me as the holder."""
        self._lease = self._replace(self._record(base), deadline)
        self._observe(self._lease)

    def _release(self) -> None:
        """Clear the holder of my last version, if that is still current; a standby takes over at once."""
        if self._lease is None or self.holder() != self.identity:
            return
        lease = copy.deepcopy(self._lease)
        lease["spec"].pop("holderIdentity", None)
        lease["spec"].update(leaseDurationSeconds=1, renewTime=micro_time())
        try:
            self._lease = self._replace(lease, time.monotonic() + self.call_timeout)
        except Exception as exc:
            if status_of(exc) == 409:
                log.info("did not release the Lease %s: it changed meanwhile", self.lease_ref)
            else:
                log.warning("could not release the Lease %s: %s", self.lease_ref, _why(exc))
            return
        log.info("released the Lease %s", self.lease_ref)

    # ---- plumbing --------------------------------------------------------------------------

    def _read(self, deadline: float) -> dict[str, Any] | None:
        return self._client.get_or_none(self._path, timeout=_left(deadline))

    def _create(self, lease: dict[str, Any], deadline: float) -> dict[str, Any]:
        return self._client.create(api_path(GROUP_VERSION, "leases", self.namespace), lease, timeout=_left(deadline))

    def _replace(self, lease: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Replace exactly the version `lease` names (a 409 when someone wrote since)."""
        return self._client.replace(self._path, lease, timeout=_left(deadline))


def _left(deadline: float) -> float:
    """The time left until `deadline` (monotonic), as a call's timeout."""
    return max(0.05, deadline - time.monotonic())
