"""Pod status: phase and conditions like the real kubelet computes them, patched only on change."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from zstack_devcluster.kubelet.api import pod_path
from zstack_devcluster.kubelet.container import Container
from zstack_devcluster.kubelet.envvars import HOST_IP
from zstack_kube.client import Client
from zstack_kube.errors import ApiError
from zstack_kube.times import now

log = logging.getLogger(__name__)

OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def phase(
    policy: str, init: Sequence[Container], main: Sequence[Container], init_done: bool, terminal: bool = False
) -> str:
    """The pod phase, following the kubelet's getPhase()."""
    regular_init = [c for c in init if not c.sidecar]
    if not init_done:
        failed = any(c.done and not c.succeeded for c in regular_init)
        if failed and (policy == "Never" or terminal):
            return "Failed"
        return "Failed" if terminal else "Pending"
    waiting = running = stopped = succeeded = 0
    for c in main:
        if c.running:
            running += 1
        elif c.terminated is not None:
            stopped += 1
            succeeded += c.terminated["exitCode"] == 0
        elif c.last_termination is not None:
            stopped += 1
        else:
            waiting += 1
    if terminal:
        return "Succeeded" if stopped == succeeded and not running and not waiting else "Failed"
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if stopped:
        if policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        if policy == "Never":
            return "Failed"
        return "Running"
    return "Pending"


def _cond(ctype: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    c: dict[str, Any] = {"type": ctype, "status": "True" if ok else "False"}
    if not ok and reason:
        c["reason"] = reason
    if not ok and message:
        c["message"] = message
    return c


def conditions(
    pod: dict[str, Any],
    pod_phase: str,
    sandbox_ready: bool,
    init: Sequence[Container],
    main: Sequence[Container],
    init_done: bool,
) -> list[dict[str, Any]]:
    """The four conditions the kubelet owns (without lastTransitionTime)."""
    completed = pod_phase in ("Succeeded", "Failed")
    sidecars = [c for c in init if c.sidecar]
    pending_init = [c.name for c in init if not c.sidecar and not c.succeeded]
    unready = [c.name for c in (*sidecars, *main) if not c.ready]
    containers_ready = not unready and init_done
    gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
    have = {c["type"]: c.get("status") for c in (pod.get("status") or {}).get("conditions") or []}
    unmet = [g for g in gates if have.get(g) != "True"]
    if completed:
        ready_reason, ready_msg = "PodCompleted", ""
    elif not containers_ready:
        ready_reason, ready_msg = "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"
    else:
        ready_reason, ready_msg = "ReadinessGatesNotReady", f"corresponding condition of pod readiness gate "\
            f"{unmet!r} does not exist or is not True"
    init_msg = f"containers with incomplete status: [{' '.join(pending_init)}]"
    return [
        _cond("PodReadyToStartContainers", sandbox_ready),
        _cond("Initialized", init_done or completed, "ContainersNotInitialized", init_msg),
        _cond("ContainersReady", containers_ready and not completed,
              "PodCompleted" if completed else "ContainersNotReady", ready_msg),
        _cond("Ready", containers_ready and not unmet and not completed, ready_reason, ready_msg),
    ]


def container_statuses(
    main: Sequence[Container], init_done: bool
) -> list[dict[str, Any]]:
    """containerStatuses; main containers wait with PodInitializing while init containers run."""
    out = []
    for c in main:
        st = c.status()
        if not init_done and "waiting" in st["state"]:
            st["state"] = {"waiting": {"reason": "PodInitializing"}}
        out.append(st)
    return out


class StatusWriter:
    """Keeps lastTransitionTimes and patches pods/status only when something changed."""

    def __init__(self, api: Client, pod: dict[str, Any]) -> None:
        self._api = api
        meta = pod["metadata"]
        self._ns, self._name, self._uid = meta["namespace"], meta["name"], meta["uid"]
        self._last: dict[str, Any] | None = None
        self._transitions: dict[str, tuple[str, str]] = {
            c["type"]: (c.get("status", ""), c.get("lastTransitionTime") or now())
            for c in (pod.get("status") or {}).get("conditions") or []
            if c.get("type") in OWN_CONDITIONS
        }

    def with_times(self, pod: dict[str, Any], own: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Own conditions with stable lastTransitionTime, plus everyone else's conditions as they are."""
        out = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") not in OWN_CONDITIONS]
        for c in own:
            prev = self._transitions.get(c["type"])
            if prev is None or prev[0] != c["status"]:
                prev = (c["status"], now())
                self._transitions[c["type"]] = prev
            out.append({**c, "lastProbeTime": None, "lastTransitionTime": prev[1]})
        return out

    def publish(self, status: dict[str, Any]) -> bool:
        """Patch when `status` differs from what was last sent; False when the pod is gone."""
        if status == self._last:
            return True
        body = {"metadata": {"uid": self._uid}, "status": status}
        try:
            self._api.patch(pod_path(self._ns, self._name, "status"), body)
        except ApiError as e:
            # A different uid (a new pod of the same name) answers 422 "metadata.uid ... immutable".
            if e.status == 404 or (e.status in (409, 422) and "uid" in e.message.lower()):
                return False
            log.warning("status of pod %s/%s not patched: %s", self._ns, self._name, e)
            self._last = None
            return True
        self._last = status
        return True


def host_fields(pod_ip: str, start_time: str) -> dict[str, Any]:
    """hostIP(s), podIP(s) and startTime."""
    out: dict[str, Any] = {"hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "startTime": start_time}
    if pod_ip:
        out["podIP"] = pod_ip
        out["podIPs"] = [{"ip": pod_ip}]
    return out
