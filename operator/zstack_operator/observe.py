"""Look at a running ZStackCluster: its StatefulSets, its MN pods and the ring each MN reports."""

from __future__ import annotations

import functools
import json
import ssl
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zstack_operator import tls
from zstack_operator.cluster import MN_CONTAINER, Cluster
from zstack_operator.kubeapi import Kube

RING_TIMEOUT = 1.0
FAILING_REASONS = {"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "ImagePullBackOff",
                   "ErrImagePull", "InvalidImageName", "CommandNotFound", "NoCommand", "RunContainerError"}


@dataclass(frozen=True)
class MnPod:
    """One MN pod: readiness, termination, a failure reason if its container cannot run, and its ring."""

    name: str
    ip: str | None
    ready: bool
    terminating: bool
    failure: str | None = None
    ring: dict[str, Any] | None = None  # the MN's /v1/cluster/ring answer: self, epoch, members, state


@dataclass(frozen=True)
class Observation:
    """What the operator saw of one cluster in one pass."""

    statefulset: dict[str, Any] | None
    pods: list[MnPod]
    broker_statefulset: dict[str, Any] | None = None
    database_statefulset: dict[str, Any] | None = None
    ring_members: list[dict[str, str]] = field(default_factory=list)  # agreed members: {pod, uuid}
    ring_agreed: bool = False
    epochs: int = 0


def observe(kube: Kube, cluster: Cluster, pool: ThreadPoolExecutor) -> Observation:
    """Read the StatefulSets and pods from the API server, and each MN's ring over HTTP (in parallel)."""
    sts = kube.get("StatefulSet", cluster.namespace, cluster.mn)
    raw_pods = kube.list("Pod", cluster.namespace, cluster.mn_selector)
    context = ring_context(kube, cluster) if tls.enabled(cluster) else None
    rings = list(pool.map(lambda p: fetch_ring(p, cluster.api_port, context), raw_pods))
    pods = [_mn_pod(p, ring) for p, ring in zip(raw_pods, rings, strict=True)]
    broker = (kube.get("StatefulSet", cluster.namespace, cluster.child("rabbitmq"))
              if cluster.mode("broker") == "managed" else None)
    database = (kube.get("StatefulSet", cluster.namespace, cluster.child("postgresql"))
                if cluster.mode("database") == "managed" else None)
    members, agreed, epochs = agreed_ring(pods)
    return Observation(sts, sorted(pods, key=lambda p: ordinal(p.name)), broker, database, members, agreed, epochs)


def ring_context(kube: Kube, cluster: Cluster) -> ssl.SSLContext:
    """How to verify the cluster's MNs: against the CA in ConfigMap `<cluster>-api-ca` (the operator writes it
    with a generated certificate; with your own Secret, put its CA there). Without it the ring, which is
    public and sent without a token, is read unverified."""
    config_map = kube.get("ConfigMap", cluster.namespace, tls.ca_config_map_name(cluster)) or {}
    return _context((config_map.get("data") or {}).get(tls.CA_KEY))


@functools.lru_cache(maxsize=256)
def _context(ca_pem: str | None) -> ssl.SSLContext:
    if ca_pem:
        try:
            return tls.client_context(ca_pem)
        except (ssl.SSLError, ValueError):
            pass  # a damaged CA: read unverified, as without one
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def fetch_ring(pod: dict[str, Any], port: int, context: ssl.SSLContext | None = None) -> dict[str, Any] | None:
    """The MN's view of the ring (over HTTPS with `context`), or None when it does not answer (not started,
    gone, or unreachable).

    A ready MN gets a second try, so one slow answer on a busy node does not flap the status."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    url = f"{'https' if context else 'http'}://{ip}:{port}/v1/cluster/ring"
    for _ in range(2 if _ready(pod) else 1):
        try:
            with urllib.request.urlopen(url, timeout=RING_TIMEOUT, context=context) as response:
                return json.load(response)
        except (OSError, ValueError):
            continue
    return None


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def agreed_ring(pods: list[MnPod]) -> tuple[list[dict[str, str]], bool, int]:
    """The members every serving MN agrees on, whether all views are identical, and how many epochs exist.

    A member counts when every running MN has it in its ring and some running MN answers as it, so a
    leaver that others still list, or a UUID nobody answers for, is not counted.
    """
    views = [(p, p.ring) for p in pods if p.ring and p.ring.get("state") == "running"]
    if not views:
        return [], False, 0
    common = set.intersection(*(set(ring.get("members") or []) for _, ring in views))
    selves = {ring["self"]: pod.name for pod, ring in views}
    members = sorted(({"pod": selves[uuid], "uuid": uuid} for uuid in common if uuid in selves),
                     key=lambda m: ordinal(m["pod"]))
    identical = len({frozenset(ring.get("members") or []) for _, ring in views}) == 1
    return members, identical, len({ring.get("epoch") for _, ring in views})


def _mn_pod(pod: dict[str, Any], ring: dict[str, Any] | None) -> MnPod:
    status = pod.get("status") or {}
    ready = _ready(pod)
    failure = None
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if container.get("name") == MN_CONTAINER and waiting.get("reason") in FAILING_REASONS:
            failure = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return MnPod(pod["metadata"]["name"], status.get("podIP"), ready,
                 bool(pod["metadata"].get("deletionTimestamp")), failure, ring)


def ordinal(pod_name: str) -> int:
    """The StatefulSet ordinal of a pod name (demo-mn-3 -> 3)."""
    tail = pod_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
