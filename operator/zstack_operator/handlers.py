"""kopf handlers: feed ZStackCluster events to the Controller. Nothing here needs a finalizer.

No delete handler, daemon or timer is registered, because kopf would then put a finalizer on every
ZStackCluster, and deleting one would hang while the operator is down. Deletion needs no code: every child
has the cluster as its owner, so the garbage collector removes them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import kopf

from zstack_operator.cluster import GROUP, MANAGER, PLURAL, VERSION
from zstack_operator.controller import Controller
from zstack_operator.reconcile import ReconcileError, Stopping

RETRY_DELAY = 5.0
MN_POD_SELECTOR = f"app.kubernetes.io/managed-by={MANAGER},app.kubernetes.io/component=mn"
MAX_RETRY_DELAY = 300.0


def retry_delay(retry: int) -> float:
    """5 s, 10 s, 20 s ... at most 5 min: a child that keeps failing is not hammered."""
    return min(MAX_RETRY_DELAY, RETRY_DELAY * 2 ** min(retry, 16))


def build_registry(controller: Controller) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers bound to `controller`."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's own bookkeeping lives under a prefix of its own: under "zstack.io/" kopf would ignore
        # every zstack.io annotation in its diffs, including zstack.io/pause-reconciliation.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="operator.zstack.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="operator.zstack.io", key="last-handled-configuration")
        settings.posting.enabled = False  # the Controller posts its own Events
        settings.execution.max_workers = 8
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 30
        # Watch only MN pods, filtered by the API server, not every pod in the cluster.
        settings.watching.label_selectors["pods"] = MN_POD_SELECTOR

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def track(event: dict[str, Any], **_: Any) -> None:
        if event.get("type") == "DELETED":
            controller.forget(event["object"])
        else:
            controller.track(event["object"])

    @kopf.on.event("", "v1", "pods", registry=registry)
    def mn_pod_changed(event: dict[str, Any], **_: Any) -> None:
        pod = event["object"]["metadata"]
        cluster = (pod.get("labels") or {}).get("zstack.io/cluster")
        if cluster:
            controller.poke(pod["namespace"], cluster)

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    def reconcile(body: kopf.Body, reason: str, retry: int, **_: Any) -> None:
        try:
            controller.reconcile(_plain(body), trigger=str(reason))
        except ReconcileError as exc:
            raise kopf.TemporaryError(str(exc), delay=retry_delay(retry)) from None
        except Stopping:
            raise kopf.TemporaryError("this replica is stopping; the next leader reconciles",
                                      delay=RETRY_DELAY) from None

    return registry


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's Body as plain dicts and lists."""
    return json.loads(json.dumps(body, default=dict))


def quiet_kopf_logs() -> None:
    """kopf logs every handler run at INFO; keep its warnings and errors, and our own INFO lines."""
    logging.getLogger("kopf").setLevel(logging.WARNING)
