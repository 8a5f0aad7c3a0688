"""NetworkPolicies of one ZStackCluster: each pod accepts only the traffic the design needs.

- MN pods: their one port (API, /metrics, the ring) from `spec.api.allowFrom`, by default from any pod in
  the cluster, or from anywhere when the API is exposed as a NodePort or LoadBalancer; always from the
  operator, which reads each MN's ring. MNs never call each other: they meet on the broker.
- Managed RabbitMQ and PostgreSQL: their port from this cluster's MN pods only.

Ingress only: MNs reach external brokers, databases and the API server at addresses no selector names.
A policy needs a network plugin that enforces it; without one the API server stores it and nothing changes.
"""

from __future__ import annotations

from typing import Any

from zstack_operator.cluster import Cluster
from zstack_operator.credentials import AMQP_PORT, POSTGRES_PORT

# Pods of the operator, in whichever namespace the chart was installed (the chart's selector label).
OPERATOR_PEER: dict[str, Any] = {"namespaceSelector": {},
                                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "zstack-operator"}}}
ANY_POD_IN_CLUSTER: dict[str, Any] = {"namespaceSelector": {}}


def enabled(cluster: Cluster) -> bool:
    return bool(cluster.section("networkPolicy").get("enabled", True))


def policies(cluster: Cluster) -> list[dict[str, Any]]:
    """The policies the spec asks for (none when spec.networkPolicy.enabled is false)."""
    if not enabled(cluster):
        return []
    mn_peer = {"podSelector": {"matchLabels": cluster.selector_labels("mn")}}
    found = [_policy(cluster, cluster.mn, "mn", cluster.api_port, _api_peers(cluster))]
    if cluster.mode("broker") == "managed":
        found.append(_policy(cluster, cluster.child("rabbitmq"), "rabbitmq", AMQP_PORT, [mn_peer]))
    if cluster.mode("database") == "managed":
        found.append(_policy(cluster, cluster.child("postgresql"), "postgresql", POSTGRES_PORT, [mn_peer]))
    return found


def names(cluster: Cluster) -> list[str]:
    """Every policy some spec may ask for: candidates for pruning."""
    return [cluster.mn, cluster.child("rabbitmq"), cluster.child("postgresql")]


def _api_peers(cluster: Cluster) -> list[dict[str, Any]] | None:
    """Who may reach the MN port; None means anyone (no `from`)."""
    api = cluster.section("api")
    if "allowFrom" in api:
        return [*api["allowFrom"], OPERATOR_PEER]
    if api.get("serviceType", "ClusterIP") != "ClusterIP":
        return None  # exposed on purpose: clients come from outside the cluster
    return [ANY_POD_IN_CLUSTER]


def _policy(cluster: Cluster, name: str, component: str, port: int,
            peers: list[dict[str, Any]] | None) -> dict[str, Any]:
    rule: dict[str, Any] = {"ports": [{"port": port, "protocol": "TCP"}]}
    if peers is not None:
        rule["from"] = peers
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": cluster.metadata(name, component),
            "spec": {"podSelector": {"matchLabels": cluster.selector_labels(component)},
                     "policyTypes": ["Ingress"], "ingress": [rule]}}
