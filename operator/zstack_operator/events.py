"""Kubernetes Events about a ZStackCluster (scale, create, pause, failures), as `kubectl describe zsc` shows them."""

from __future__ import annotations

import datetime as dt
import logging

from zstack_kube.errors import ApiError
from zstack_operator.cluster import API_VERSION, KIND, MANAGER, Cluster
from zstack_operator.kubeapi import Kube

log = logging.getLogger(__name__)


class EventRecorder:
    """Posts core/v1 Events; a failure to post is logged, never raised (events are best effort)."""

    def __init__(self, kube: Kube, instance: str) -> None:
        self.kube = kube
        self.instance = instance

    def normal(self, cluster: Cluster, reason: str, message: str) -> None:
        self._post(cluster, "Normal", reason, message)

    def warning(self, cluster: Cluster, reason: str, message: str) -> None:
        self._post(cluster, "Warning", reason, message)

    def _post(self, cluster: Cluster, type_: str, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{cluster.name}.", "namespace": cluster.namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": cluster.name,
                               "namespace": cluster.namespace, "uid": cluster.uid},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": MANAGER}, "reportingComponent": MANAGER, "reportingInstance": self.instance,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.kube.create(event)
        except ApiError as exc:
            log.warning("could not post event %s for %s/%s: %s", reason, cluster.namespace, cluster.name, exc)
