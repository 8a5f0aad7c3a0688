"""Secrets with generated credentials: created once by the operator and never overwritten.

The values are random (the `secrets` module) and go straight into the Secret; nothing logs them.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote

from zstack_operator.cluster import Cluster

USER = "zstack"
DATABASE = "zstack"
AMQP_PORT = 5672
POSTGRES_PORT = 5432


def _secret(cluster: Cluster, name: str, component: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": cluster.metadata(name, component), "stringData": data}


def api_token_secret(cluster: Cluster) -> dict[str, Any]:
    """`<cluster>-api-token`: the bearer token of the cloud API (used when spec.api.authSecret is unset)."""
    return _secret(cluster, cluster.child("api-token"), "mn", {"token": secrets.token_urlsafe(32)})


def broker_secret(cluster: Cluster) -> dict[str, Any]:
    """`<cluster>-broker`: the managed RabbitMQ's user, password and the MNs' AMQP URL."""
    password = secrets.token_urlsafe(24)
    host = f"{cluster.child('rabbitmq')}.{cluster.namespace}.svc"
    url = f"amqp://{USER}:{quote(password, safe='')}@{host}:{AMQP_PORT}/%2F"
    return _secret(cluster, cluster.child("broker"), "rabbitmq",
                   {"username": USER, "password": password, "url": url})


def database_secret(cluster: Cluster) -> dict[str, Any]:
    """`<cluster>-database`: the managed PostgreSQL's user, password, database and the MNs' URL."""
    password = secrets.token_urlsafe(24)
    host = f"{cluster.child('postgresql')}.{cluster.namespace}.svc"
    url = f"postgresql://{USER}:{quote(password, safe='')}@{host}:{POSTGRES_PORT}/{DATABASE}"
    return _secret(cluster, cluster.child("database"), "postgresql",
                   {"username": USER, "password": password, "database": DATABASE, "url": url})


def secret_ref(cluster: Cluster, dependency: str) -> tuple[str, str]:
    """(Secret name, key) holding the URL of "broker" or "database", external or managed."""
    if cluster.mode(dependency) == "external":
        ref = cluster.section(dependency, "external").get("secretRef") or {}
        return ref["name"], ref.get("key", "url")
    return cluster.child(dependency), "url"


def api_token_ref(cluster: Cluster) -> tuple[str, str]:
    """(Secret name, key) of the API token: spec.api.authSecret, else the generated one."""
    ref = cluster.section("api").get("authSecret")
    if ref:
        return ref["name"], ref.get("key", "token")
    return cluster.child("api-token"), "token"


def generated_secrets(cluster: Cluster) -> list[dict[str, Any]]:
    """The Secrets this cluster needs the operator to generate."""
    wanted = []
    if not cluster.section("api").get("authSecret"):
        wanted.append(api_token_secret(cluster))
    if cluster.mode("broker") == "managed":
        wanted.append(broker_secret(cluster))
    if cluster.mode("database") == "managed":
        wanted.append(database_secret(cluster))
    return wanted
