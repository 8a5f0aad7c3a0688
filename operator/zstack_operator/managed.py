"""Managed dependencies: a single-replica RabbitMQ and PostgreSQL, each a StatefulSet with a PVC and a Service.

Their credentials come from the generated `<cluster>-broker` and `<cluster>-database` Secrets. Their volumes
are deleted with the ZStackCluster (the Secrets are too, and a kept volume would not accept new ones).
"""

from __future__ import annotations

from typing import Any

from zstack_operator.cluster import Cluster
from zstack_operator.credentials import AMQP_PORT, POSTGRES_PORT

# The public images users pull, pinned to a patch release (a floating tag changes under a running cluster);
# spec.*.managed.image may name another, by tag or by digest (image@sha256:...).
RABBITMQ_IMAGE = "rabbitmq:3.13.7-alpine"
POSTGRES_IMAGE = "postgres:16.4-alpine"
# Their images' own users run them (uid:gid): rabbitmq 100:101, postgres 70:70 (the alpine variants).
# Used when spec.<broker|database>.managed.resources is absent: enough for a few MNs, bounded on memory.
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    "rabbitmq": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "postgresql": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
}
# Pod Security "restricted": no privilege escalation, no capabilities. PostgreSQL's image writes only to its
# data volume, its socket dir and /tmp, so its root filesystem is read-only; RabbitMQ's image rewrites files
# under /etc/rabbitmq at start, so its root stays writable (still as its own non-root user).
CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

def rabbitmq(cluster: Cluster) -> list[dict[str, Any]]:
    """StatefulSet and Service `<cluster>-rabbitmq`."""
    name, secret = cluster.child("rabbitmq"), cluster.child("broker")
    container = {
        "name": "rabbitmq",
        "image": cluster.section("broker", "managed").get("image", RABBITMQ_IMAGE),
        "ports": [{"name": "amqp", "containerPort": AMQP_PORT, "protocol": "TCP"}],
        "env": [_secret_env("RABBITMQ_DEFAULT_USER", secret, "username"),
                _secret_env("RABBITMQ_DEFAULT_PASS", secret, "password")],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/rabbitmq"}],
        "securityContext": {**CONTAINER_SECURITY, "readOnlyRootFilesystem": False},
        "readinessProbe": {"exec": {"command": ["rabbitmq-diagnostics", "-q", "check_port_connectivity"]},
                           "periodSeconds": 10, "timeoutSeconds": 10},
        "livenessProbe": {"exec": {"command": ["rabbitmq-diagnostics", "-q", "status"]},
                          "initialDelaySeconds": 60, "periodSeconds": 30, "timeoutSeconds": 20},
    }
    return [_statefulset(cluster, name, "rabbitmq", "broker", container, user=100, group=101),
            _service(cluster, name, "rabbitmq", "amqp", AMQP_PORT)]


def postgresql(cluster: Cluster) -> list[dict[str, Any]]:
    """StatefulSet and Service `<cluster>-postgresql`."""
    name, secret = cluster.child("postgresql"), cluster.child("database")
    ready = ["sh", "-c", 'pg_isready -h 127.0.0.1 -U "$POSTGRES_USER" -d "$POSTGRES_DB"']
    container = {
        "name": "postgresql",
        "image": cluster.section("database", "managed").get("image", POSTGRES_IMAGE),
        "ports": [{"name": "postgresql", "containerPort": POSTGRES_PORT, "protocol": "TCP"}],
        "env": [_secret_env("POSTGRES_USER", secret, "username"),
                _secret_env("POSTGRES_PASSWORD", secret, "password"),
                _secret_env("POSTGRES_DB", secret, "database"),
                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                         {"name": "run", "mountPath": "/var/run/postgresql"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {**CONTAINER_SECURITY, "readOnlyRootFilesystem": True},
        "readinessProbe": {"exec": {"command": ready}, "periodSeconds": 5, "timeoutSeconds": 5},
        "livenessProbe": {"exec": {"command": ready}, "initialDelaySeconds": 30, "periodSeconds": 15,
                          "timeoutSeconds": 5, "failureThreshold": 6},
    }
    scratch = [{"name": "run", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    return [_statefulset(cluster, name, "postgresql", "database", container, user=70, group=70,
                         volumes=scratch),
            _service(cluster, name, "postgresql", "postgresql", POSTGRES_PORT)]


def _storage(cluster: Cluster, dependency: str) -> dict[str, Any]:
    storage = cluster.section(dependency, "managed", "storage")
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": str(storage.get("size", "1Gi"))}}}
    if storage.get("storageClassName"):
        claim["storageClassName"] = storage["storageClassName"]
    return claim


def _statefulset(cluster: Cluster, name: str, component: str, dependency: str, container: dict[str, Any], *,
                 user: int, group: int, volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One replica of `container` as the image's own `user` and `group`, its data on a claim (spec.*.managed)."""
    container["resources"] = cluster.section(dependency, "managed").get("resources") or DEFAULT_RESOURCES[component]
    pod_security = {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": group, "fsGroup": group,
                    "seccompProfile": {"type": "RuntimeDefault"}}
    pod_spec: dict[str, Any] = {"securityContext": pod_security, "terminationGracePeriodSeconds": 60,
                                "containers": [container]}
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": cluster.metadata(name, component),
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": cluster.selector_labels(component)},
            "template": {
                "metadata": {"labels": cluster.labels(component)},
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": cluster.labels(component)},
                                      "spec": _storage(cluster, dependency)}],
            # Deleting the cluster deletes its data: the generated credentials go with it, and a kept volume
            # would refuse the new cluster's new password. Scaling never deletes a claim.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
        },
    }


def _service(cluster: Cluster, name: str, component: str, port_name: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": cluster.metadata(name, component),
            "spec": {"ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}],
                     "selector": cluster.selector_labels(component)}}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
