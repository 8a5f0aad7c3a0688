"""The desired objects of the management nodes: settings, access, Services, the StatefulSet and its PDB."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from zstack_node.config import default
from zstack_node.version import NODE_IMAGE
from zstack_operator import tls
from zstack_operator.cluster import CONFIG_HASH_ANNOTATION, MN_CONTAINER, Cluster
from zstack_operator.credentials import api_token_ref, secret_ref

PRE_STOP_SECONDS = 1  # lets Services drop a leaving pod before its MN stops taking API requests
# Relabelings of every scrape of the MNs (ServiceMonitor, PodMonitor, devcluster's Prometheus): the pod label
# zstack.io/cluster becomes the target label `zstack_cluster`, which the dashboards' cluster variable reads.
METRICS_RELABELINGS: list[dict[str, Any]] = [
    {"sourceLabels": ["__meta_kubernetes_pod_label_zstack_io_cluster"], "targetLabel": "zstack_cluster"},
]

# The MNs' rights (their Leases, a read of their own Pod): a ClusterRole the chart ships, the same as
# zstack_node's manifests/mn-rbac.yaml. The operator may bind it and no other role.
MN_CLUSTER_ROLE = "zstack-mn"
# Used when spec.resources is absent: an MN idles at about 100 MiB; the limit leaves room for 100k VMs' lists.
DEFAULT_RESOURCES: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
TOKEN_VOLUME = "api-token"
TOKEN_DIR = "/var/run/zstack/api-token"  # the API token Secret, mounted read-only
# The broker's and database's URLs (with their passwords) as files too: env vars show in /proc/<pid>/environ.
URL_SECRETS = {"broker": "/var/run/zstack/broker", "database": "/var/run/zstack/database"}

def config_map(cluster: Cluster) -> dict[str, Any]:
    """`<cluster>-mn-config`: the MN settings from spec.node, as zstack-node's env vars."""
    node = cluster.section("node")
    data = {
        "ZSTACK_CLUSTER": cluster.name,
        "ZSTACK_HTTP_PORT": str(cluster.api_port),
        "ZSTACK_HEARTBEAT_INTERVAL": _number(node.get("heartbeatIntervalSeconds", default("heartbeat_interval"))),
        "ZSTACK_HEARTBEAT_TIMEOUT": _number(node.get("heartbeatTimeoutSeconds", default("heartbeat_timeout"))),
        "ZSTACK_LEASE_DURATION": _number(node.get("leaseDurationSeconds", default("lease_duration"))),
        "ZSTACK_RING_VNODES": str(int(node.get("ringVirtualNodes", default("ring_vnodes")))),
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": cluster.metadata(cluster.child("mn-config"), "mn"),
            "data": data}


def access(cluster: Cluster, cluster_role: str = MN_CLUSTER_ROLE) -> list[dict[str, Any]]:
    """ServiceAccount `<cluster>-mn` and its RoleBinding to the MNs' ClusterRole in the cluster's namespace.

    The binding is named after the role too: roleRef is immutable, so another role means another binding."""
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": cluster.metadata(cluster.mn, "mn")}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": cluster.metadata(f"{cluster.mn}-{cluster_role}", "mn"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
               "subjects": [{"kind": "ServiceAccount", "name": cluster.mn, "namespace": cluster.namespace}]}
    return [account, binding]


def services(cluster: Cluster) -> list[dict[str, Any]]:
    """The headless Service of the StatefulSet (also scraped for metrics) and the API Service."""
    api = cluster.section("api")
    port = {"name": "http", "port": cluster.api_port, "targetPort": "http", "protocol": "TCP"}
    headless_meta = cluster.metadata(cluster.mn, "mn")
    headless_meta["labels"]["zstack.io/metrics"] = "true"
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": headless_meta,
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "ports": [port],
                         "selector": cluster.selector_labels("mn")}}
    api_port = dict(port, **({"nodePort": api["nodePort"]} if api.get("nodePort") else {}))
    api_service = {"apiVersion": "v1", "kind": "Service", "metadata": cluster.metadata(cluster.child("api"), "mn"),
                   "spec": {"type": api.get("serviceType", "ClusterIP"), "ports": [api_port],
                            "selector": cluster.selector_labels("mn")}}
    return [headless, api_service]


def statefulset(cluster: Cluster, config: dict[str, Any]) -> dict[str, Any]:
    """`<cluster>-mn`: Parallel pods running zstack-node, rolled when the settings ConfigMap changes."""
    pod = cluster.section("pod")
    template_meta = {
        "labels": {**pod.get("labels", {}), **cluster.labels("mn")},
        "annotations": {**pod.get("annotations", {}), CONFIG_HASH_ANNOTATION: config_hash(config)},
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": cluster.mn,
        "terminationGracePeriodSeconds": int(cluster.spec.get("terminationGracePeriodSeconds", 30)),
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(cluster, config)],
        # The token as a file, not an env var (which `kubectl describe` and /proc show); the kubelet updates
        # the file in place when the Secret changes, and the MN reads it again: a rotation needs no restart.
        "volumes": [{"name": TOKEN_VOLUME, "secret": {"secretName": api_token_ref(cluster)[0],
                                                      "items": [{"key": api_token_ref(cluster)[1], "path": "token"}]}},
                    *({"name": f"{dependency}-url", "secret": {"secretName": secret_ref(cluster, dependency)[0],
                                                               "items": [{"key": secret_ref(cluster, dependency)[1],
                                                                          "path": "url"}]}}
                      for dependency in URL_SECRETS)],
    }
    if tls.enabled(cluster):
        pod_spec["volumes"].append({"name": tls.VOLUME, "secret": {"secretName": tls.secret_name(cluster),
                                                                  "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                                            {"key": "tls.key", "path": "tls.key"}]}})
    for key in ("nodeSelector", "tolerations", "affinity"):
        if pod.get(key):
            pod_spec[key] = pod[key]
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": cluster.metadata(cluster.mn, "mn"),
        "spec": {
            "replicas": cluster.replicas,
            "serviceName": cluster.mn,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": cluster.selector_labels("mn")},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def _container(cluster: Cluster, config: dict[str, Any]) -> dict[str, Any]:
    def field_ref(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [
        field_ref("POD_NAME", "metadata.name"),
        field_ref("POD_NAMESPACE", "metadata.namespace"),
        field_ref("POD_IP", "status.podIP"),
        {"name": "ZSTACK_HTTP_BIND", "value": "$(POD_IP)"},
        {"name": "ZSTACK_ADVERTISE_ADDRESS", "value": "$(POD_IP)"},
        *({"name": f"ZSTACK_{dependency.upper()}_URL_FILE", "value": f"{mount}/url"}
          for dependency, mount in URL_SECRETS.items()),
        {"name": "ZSTACK_API_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
    ]
    mounts = [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
              *({"name": f"{dependency}-url", "mountPath": mount, "readOnly": True}
                for dependency, mount in URL_SECRETS.items())]
    scheme = "HTTP"
    if tls.enabled(cluster):  # the kubelet updates the files in place; the MN serves a new pair without a restart
        env += [{"name": "ZSTACK_TLS_CERT_FILE", "value": f"{tls.MOUNT_DIR}/tls.crt"},
                {"name": "ZSTACK_TLS_KEY_FILE", "value": f"{tls.MOUNT_DIR}/tls.key"}]
        mounts.append({"name": tls.VOLUME, "mountPath": tls.MOUNT_DIR, "readOnly": True})
        scheme = "HTTPS"
    container: dict[str, Any] = {
        "name": MN_CONTAINER,
        "image": cluster.spec.get("image", NODE_IMAGE),
        "imagePullPolicy": cluster.spec.get("imagePullPolicy", "IfNotPresent"),
        "command": ["zstack-node"],
        "ports": [{"name": "http", "containerPort": cluster.api_port, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config["metadata"]["name"]}}],
        "env": env,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http", "scheme": scheme}, "periodSeconds": 1,
                           "timeoutSeconds": 1, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": scheme}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    container["resources"] = cluster.spec.get("resources") or DEFAULT_RESOURCES
    return container


def pod_disruption_budget(cluster: Cluster) -> dict[str, Any]:
    """`<cluster>-mn`: at most one MN down at a time through voluntary disruptions (drains)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": cluster.metadata(cluster.mn, "mn"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": cluster.selector_labels("mn")}}}


def service_monitor(cluster: Cluster) -> dict[str, Any]:
    """Scrapes the MNs through the headless Service. `honorLabels`: the target label `service` (the Kubernetes
    Service) would otherwise rename the MN's own `service` label (the bus service) to `exported_service`."""
    endpoint = {"port": "http", "path": "/metrics", "honorLabels": True,
                "relabelings": copy.deepcopy(METRICS_RELABELINGS), **_scrape_tls(cluster)}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": cluster.metadata(cluster.mn, "mn"),
            "spec": {"selector": {"matchLabels": {**cluster.selector_labels("mn"), "zstack.io/metrics": "true"}},
                     "endpoints": [endpoint]}}


def pod_monitor(cluster: Cluster) -> dict[str, Any]:
    """Scrapes the MN pods directly."""
    endpoint = {"port": "http", "path": "/metrics", "relabelings": copy.deepcopy(METRICS_RELABELINGS),
                **_scrape_tls(cluster)}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": cluster.metadata(cluster.mn, "mn"),
            "spec": {"selector": {"matchLabels": cluster.selector_labels("mn")},
                     "podMetricsEndpoints": [endpoint]}}


def _scrape_tls(cluster: Cluster) -> dict[str, Any]:
    """Prometheus scrapes over HTTPS, verifying against the CA's ConfigMap and the API Service's name (one of
    the certificate's names)."""
    if not tls.enabled(cluster):
        return {}
    return {"scheme": "https",
            "tlsConfig": {"ca": {"configMap": {"name": tls.ca_config_map_name(cluster), "key": tls.CA_KEY}},
                          "serverName": f"{cluster.child('api')}.{cluster.namespace}.svc"}}


def config_hash(config: dict[str, Any]) -> str:
    """A short digest of the settings: a change rolls the MN pods, which read them only at start."""
    return hashlib.sha256(json.dumps(config["data"], sort_keys=True).encode()).hexdigest()[:16]


def _number(value: Any) -> str:
    """Seconds as zstack-node reads them: "1", "0.5"."""
    return f"{float(value):g}"
