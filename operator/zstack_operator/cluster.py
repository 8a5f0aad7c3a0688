"""One ZStackCluster as the operator sees it: its identity, its spec with defaults, and its children's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zstack_node.config import default

GROUP = "zstack.io"
VERSION = "v1alpha1"
PLURAL = "zstackclusters"
KIND = "ZStackCluster"
API_VERSION = f"{GROUP}/{VERSION}"

PAUSE_ANNOTATION = "zstack.io/pause-reconciliation"
CONFIG_HASH_ANNOTATION = "zstack.io/config-hash"
MANAGER = "zstack-operator"
MN_CONTAINER = "mn"


@dataclass(frozen=True)
class Cluster:
    """A ZStackCluster's metadata and spec. The API server has applied the CRD's defaults to `spec`."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: dict[str, Any]
    annotations: dict[str, str]

    @classmethod
    def from_body(cls, body: Any) -> Cluster:
        """Build from a ZStackCluster object (a dict or kopf Body)."""
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 0),
            spec=dict(body.get("spec") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )

    # ---- state ------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.annotations.get(PAUSE_ANNOTATION, "").strip().lower() == "true"

    @property
    def replicas(self) -> int:
        return int(self.spec.get("replicas", 3))

    def section(self, *path: str) -> dict[str, Any]:
        """A nested spec object, `{}` when absent (e.g. section("broker", "managed"))."""
        value: Any = self.spec
        for key in path:
            value = (value or {}).get(key)
        return dict(value or {})

    def mode(self, dependency: str) -> str:
        """"managed" or "external" for "broker" or "database" (the CRD allows exactly one)."""
        return "external" if "external" in self.section(dependency) else "managed"

    @property
    def api_port(self) -> int:
        return int(self.section("api").get("port", default("http_port")))

    # ---- names and labels -------------------------------------------------------------------

    def child(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    @property
    def mn(self) -> str:
        """The MN StatefulSet, its headless Service, PDB and ServiceAccount."""
        return self.child("mn")

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "zstack",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": MANAGER,
            "zstack.io/cluster": self.name,
        }

    def selector_labels(self, component: str) -> dict[str, str]:
        """The immutable subset that StatefulSets and Services select on."""
        return {"app.kubernetes.io/instance": self.name, "app.kubernetes.io/component": component}

    @property
    def mn_selector(self) -> str:
        """The MN pods' label selector as a string, for status.selector (scale subresource, HPA)."""
        return ",".join(f"{k}={v}" for k, v in self.selector_labels("mn").items())

    def owner_reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}

    def metadata(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        """metadata for a child: name, namespace, labels and the controller ownerReference."""
        return {"name": name, "namespace": self.namespace, "labels": self.labels(component),
                "ownerReferences": [self.owner_reference()], **extra}
