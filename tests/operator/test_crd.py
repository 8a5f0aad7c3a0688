"""The ZStackCluster CRD (crds/zstackcluster.yaml) on a real API server, with no operator running.

What a user meets before any operator acts: the examples are accepted, an empty spec is filled with
the documented defaults, bad specs are refused with an error naming the field, `kubectl explain`
documents the fields, `kubectl scale` and `kubectl get` work, and the Lease rule agrees with the MN's.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import wait_for
from zstack_node.config import ConfigError, Settings

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "zstackcluster.yaml"
MANAGED_EXAMPLE = REPO / "examples" / "zstackcluster.yaml"
EXTERNAL_EXAMPLE = REPO / "examples" / "zstackcluster-external.yaml"
CRD_NAME = "zstackclusters.zstack.io"

DEFAULT_SPEC = {
    "replicas": 3,
    "image": "zstack-node:0.1.0",
    "imagePullPolicy": "IfNotPresent",
    "terminationGracePeriodSeconds": 30,
    "node": {"heartbeatIntervalSeconds": 1, "heartbeatTimeoutSeconds": 4, "leaseDurationSeconds": 5,
             "ringVirtualNodes": 4000},
    "api": {"serviceType": "ClusterIP", "port": 8080, "tls": {"enabled": True}},
    "broker": {"managed": {"image": "rabbitmq:3.13.7-alpine", "storage": {"size": "1Gi"}}},
    "database": {"managed": {"image": "postgres:16.4-alpine", "storage": {"size": "1Gi"}}},
    "metrics": {"serviceMonitor": False, "podMonitor": False},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True},
}


# ---- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(devcluster: KubeCluster) -> KubeCluster:
    """The devcluster with the CRD applied and Established (left installed: other modules apply it too)."""
    devcluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    devcluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return devcluster


class Namespace:
    """One fresh namespace and kubectl in it."""

    def __init__(self, cluster: KubeCluster, name: str) -> None:
        self.cluster, self.name = cluster, name

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.name, *args, check=check, input=input)

    def apply(self, spec: dict[str, Any], name: str = "demo", verb: str = "apply") -> subprocess.CompletedProcess[str]:
        """`kubectl apply --validate=strict` a ZStackCluster with this spec; never raises. verb "create" leaves out
        the last-applied-configuration annotation, a copy of the spec that counts against its own 256 KiB."""
        return self.kubectl(verb, "--validate=strict", "-f", "-", check=False,
                            input=json.dumps(zstackcluster(spec, name)))

    def get(self, name: str = "demo") -> dict[str, Any]:
        return json.loads(self.kubectl("get", "zstackcluster", name, "-o", "json").stdout)


@pytest.fixture
def ns(crd: KubeCluster) -> Iterator[Namespace]:
    name = f"crd-{uuid.uuid4().hex[:8]}"
    crd.kubectl("create", "namespace", name)
    try:
        yield Namespace(crd, name)
    finally:
        crd.kubectl("delete", "namespace", name, "--wait=false", check=False)


def zstackcluster(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "zstack.io/v1alpha1", "kind": "ZStackCluster", "metadata": {"name": name}, "spec": spec}


def expect_rejected(ns: Namespace, spec: dict[str, Any], field: str, says: str = "", verb: str = "apply") -> None:
    """The API server refuses `spec`, naming `field` (and saying `says`), and stores nothing."""
    proc = ns.apply(spec, verb=verb)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"spec {spec} was accepted:\n{output}"
    named = [line for line in output.splitlines() if f"{field}:" in line or f'unknown field "{field}"' in line]
    assert named, f"the error does not name {field}:\n{output}"
    assert says in "\n".join(named), f"the error about {field} does not say {says!r}:\n{output}"
    assert ns.kubectl("get", "zstackcluster", "demo", check=False).returncode != 0


def expect_accepted(ns: Namespace, spec: dict[str, Any], verb: str = "apply") -> None:
    proc = ns.apply(spec, verb=verb)
    assert proc.returncode == 0, f"spec {spec} was rejected:\n{proc.stdout}{proc.stderr}"


# ---- the file itself -----------------------------------------------------------------------------


def _undocumented(schema: dict[str, Any], path: str) -> list[str]:
    """Paths of the schemas under `schema` (properties, items, map values) that lack a description."""
    missing = [] if schema.get("description") else [path]
    children = [(f"{path}.{name}", sub) for name, sub in schema.get("properties", {}).items()]
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            children.append((path + suffix, schema[key]))
    for child_path, child in children:
        if child_path != ".metadata":  # the API server forbids a description on metadata
            missing += _undocumented(child, child_path)
    return missing


def test_every_field_is_documented() -> None:
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _undocumented(schema, "") == []


# ---- accepted specs and defaults -----------------------------------------------------------------


@pytest.mark.parametrize("example", [MANAGED_EXAMPLE, EXTERNAL_EXAMPLE], ids=["managed", "external"])
def test_examples_are_accepted(ns: Namespace, example: Path) -> None:
    out = ns.kubectl("apply", "--validate=strict", "--dry-run=server", "-f", str(example)).stdout
    assert "zstackcluster.zstack.io/demo created (server dry run)" in out


def test_empty_spec_gets_the_documented_defaults(ns: Namespace) -> None:
    expect_accepted(ns, {})
    assert ns.get()["spec"] == DEFAULT_SPEC


def test_managed_example_spells_out_the_defaults(ns: Namespace) -> None:
    """Its comment promises that deleting any field changes nothing."""
    out = ns.kubectl("apply", "--dry-run=server", "-f", str(MANAGED_EXAMPLE), "-o", "json").stdout
    assert json.loads(out)["spec"] == DEFAULT_SPEC


def test_external_mode_defaults_the_secret_key_and_adds_no_managed_backend(ns: Namespace) -> None:
    expect_accepted(ns, {"broker": {"external": {"secretRef": {"name": "my-broker"}}},
                         "database": {"external": {"secretRef": {"name": "my-db", "key": "dsn"}}}})
    spec = ns.get()["spec"]
    assert spec["broker"] == {"external": {"secretRef": {"name": "my-broker", "key": "url"}}}
    assert spec["database"] == {"external": {"secretRef": {"name": "my-db", "key": "dsn"}}}


def test_partial_node_settings_keep_the_other_defaults(ns: Namespace) -> None:
    expect_accepted(ns, {"node": {"heartbeatIntervalSeconds": 0.5}})
    assert ns.get()["spec"]["node"] == {"heartbeatIntervalSeconds": 0.5, "heartbeatTimeoutSeconds": 4,
                                        "leaseDurationSeconds": 5, "ringVirtualNodes": 4000}


def test_images_by_registry_tag_and_digest_are_accepted(ns: Namespace) -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    images = {"image": f"registry.example.com:5000/zstack/zstack-node:0.1.0@{digest}",
              "broker": {"managed": {"image": f"rabbitmq@{digest}"}},
              "database": {"managed": {"image": "ghcr.io/me/postgres:16.4-alpine"}}}
    expect_accepted(ns, images)
    spec = ns.get()["spec"]
    assert spec["image"] == images["image"]
    assert spec["broker"]["managed"]["image"] == f"rabbitmq@{digest}"


def test_pod_overrides_and_node_port_are_accepted(ns: Namespace) -> None:
    pod = {"nodeSelector": {"kubernetes.io/os": "linux"},
           "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "zstack", "effect": "NoSchedule"}],
           "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
           "labels": {"team": "cloud"}, "annotations": {"example.com/owner": "cloud"}}
    expect_accepted(ns, {"api": {"serviceType": "NodePort", "nodePort": 30080, "authSecret": {"name": "tok"}},
                         "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1}},
                         "pod": pod})
    spec = ns.get()["spec"]
    assert spec["pod"] == pod
    assert spec["api"]["authSecret"] == {"name": "tok", "key": "token"}


def test_tls_allow_from_and_backend_resources_are_accepted(ns: Namespace) -> None:
    allow_from = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cloud-clients"}}},
        {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "zstack-cli"}}},
        {"podSelector": {"matchExpressions": [{"key": "zstack.io/client", "operator": "Exists"}]}},
        {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}},
        {"ipBlock": {"cidr": "2001:db8::/32"}},
    ]
    resources = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    # cert-manager's Certificate writes a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt.
    expect_accepted(ns, {"api": {"tls": {"secretName": "demo-api-tls.cert-manager"}, "allowFrom": allow_from},
                         "broker": {"managed": {"resources": resources}},
                         "database": {"managed": {"resources": resources}},
                         "networkPolicy": {"enabled": False}})
    spec = ns.get()["spec"]
    assert spec["api"]["tls"] == {"enabled": True, "secretName": "demo-api-tls.cert-manager"}
    assert spec["api"]["allowFrom"] == allow_from
    assert spec["broker"]["managed"]["resources"] == spec["database"]["managed"]["resources"] == resources
    assert spec["networkPolicy"] == {"enabled": False}


def test_plain_http_is_an_explicit_opt_out(ns: Namespace) -> None:
    expect_accepted(ns, {"api": {"port": 8443}})
    assert ns.get()["spec"]["api"]["tls"] == {"enabled": True}, "tls.enabled must default to true"
    expect_accepted(ns, {"api": {"tls": {"enabled": False}}})
    assert ns.get()["spec"]["api"]["tls"] == {"enabled": False}


def test_labels_and_annotations_within_the_rules_are_accepted(ns: Namespace) -> None:
    labels = {"team": "cloud", "example.com/tier": "", "a.b-c.example/Name_1.x": "V-1_2.3", "x": "y" * 63,
              "k" * 63: "v", "p" * 253 + "/n": "v", "kubernetes.io/arch": "amd64"}
    annotations = {"example.com/owner": "cloud team <cloud@example.com>", "note": "free text:\n anything goes",
                   "big": "x" * 262_000}
    expect_accepted(ns, {"pod": {"labels": labels, "annotations": annotations}}, verb="create")
    spec = ns.get()["spec"]
    assert spec["pod"]["labels"] == labels and spec["pod"]["annotations"] == annotations


# ---- rejected specs ------------------------------------------------------------------------------

EXTERNAL = {"external": {"secretRef": {"name": "url-secret"}}}

BAD_SPECS = [
    pytest.param({"replicas": -1}, "spec.replicas", "greater than or equal to 0", id="negative-replicas"),
    pytest.param({"replicas": 101}, "spec.replicas", "less than or equal to 100", id="too-many-replicas"),
    pytest.param({"image": ""}, "spec.image", "", id="empty-image"),
    pytest.param({"image": "Zstack-Node:1"}, "spec.image", "should match", id="image-uppercase"),
    pytest.param({"image": "zstack node:1"}, "spec.image", "should match", id="image-with-a-space"),
    pytest.param({"image": "zstack-node@sha256:abc"}, "spec.image", "should match", id="image-short-digest"),
    pytest.param({"broker": {"managed": {"image": "rabbitmq:"}}}, "spec.broker.managed.image", "should match",
                 id="broker-image-empty-tag"),
    pytest.param({"database": {"managed": {"image": "postgres:16 --evil"}}}, "spec.database.managed.image",
                 "should match", id="database-image-with-arguments"),
    pytest.param({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy", "Sometimes", id="unknown-pull-policy"),
    pytest.param({"terminationGracePeriodSeconds": 1}, "spec.terminationGracePeriodSeconds", "",
                 id="grace-period-too-short"),
    pytest.param({"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory", "lots",
                 id="resource-not-a-quantity"),
    pytest.param({"node": {"heartbeatIntervalSeconds": 0}}, "spec.node.heartbeatIntervalSeconds",
                 "at least 0.1 seconds", id="zero-heartbeat-interval"),
    pytest.param({"node": {"heartbeatIntervalSeconds": 0.05}}, "spec.node.heartbeatIntervalSeconds", "0.1",
                 id="heartbeat-interval-too-short"),
    pytest.param({"node": {"heartbeatIntervalSeconds": 0, "heartbeatTimeoutSeconds": 0}},
                 "spec.node.heartbeatTimeoutSeconds", "at least 0.2 seconds", id="zero-heartbeat-timeout"),
    pytest.param({"node": {"heartbeatIntervalSeconds": 1, "heartbeatTimeoutSeconds": 1.5}},
                 "spec.node.heartbeatTimeoutSeconds", "at least twice spec.node.heartbeatIntervalSeconds",
                 id="timeout-under-twice-interval"),
    pytest.param({"node": {"heartbeatIntervalSeconds": 2, "leaseDurationSeconds": 3}},
                 "spec.node.leaseDurationSeconds", "at least twice spec.node.heartbeatIntervalSeconds",
                 id="lease-under-twice-interval"),
    pytest.param({"node": {"leaseDurationSeconds": 700}}, "spec.node.leaseDurationSeconds", "", id="lease-too-long"),
    pytest.param({"node": {"ringVirtualNodes": 0}}, "spec.node.ringVirtualNodes", "", id="no-virtual-nodes"),
    pytest.param({"api": {"port": 70000}}, "spec.api.port", "65535", id="port-out-of-range"),
    pytest.param({"api": {"serviceType": "Ingress"}}, "spec.api.serviceType", "Ingress", id="unknown-service-type"),
    pytest.param({"api": {"nodePort": 30080}}, "spec.api.nodePort", "needs spec.api.serviceType NodePort",
                 id="node-port-on-cluster-ip"),
    pytest.param({"api": {"serviceType": "NodePort", "nodePort": 80}}, "spec.api.nodePort", "30000",
                 id="node-port-out-of-range"),
    pytest.param({"api": {"authSecret": {"key": "token"}}}, "spec.api.authSecret.name", "Required",
                 id="auth-secret-without-name"),
    pytest.param({"broker": {"managed": {}, **EXTERNAL}}, "spec.broker", "set exactly one of managed or external",
                 id="broker-managed-and-external"),
    pytest.param({"broker": {}}, "spec.broker", "set exactly one of managed or external", id="broker-neither"),
    pytest.param({"broker": {"external": {"secretRef": {"name": "Not_A_Name"}}}},
                 "spec.broker.external.secretRef.name", "Not_A_Name", id="broker-secret-not-a-dns-name"),
    pytest.param({"broker": {"managed": {"storage": {"size": "big"}}}}, "spec.broker.managed.storage.size", "big",
                 id="broker-storage-not-a-quantity"),
    pytest.param({"database": {"managed": {}, **EXTERNAL}}, "spec.database",
                 "set exactly one of managed or external", id="database-managed-and-external"),
    pytest.param({"database": {"external": {}}}, "spec.database.external.secretRef", "Required",
                 id="database-external-without-secret"),
    pytest.param({"replica": 3}, "spec.replica", "", id="unknown-field"),
    # durations: each has a maximum of at most a day; JSON cannot carry inf or NaN, but it can carry 1e300
    pytest.param({"node": {"heartbeatIntervalSeconds": 1e300}}, "spec.node.heartbeatIntervalSeconds",
                 "less than or equal to 60", id="huge-heartbeat-interval"),
    pytest.param({"node": {"heartbeatTimeoutSeconds": 86401}}, "spec.node.heartbeatTimeoutSeconds",
                 "less than or equal to 600", id="heartbeat-timeout-over-a-day"),
    pytest.param({"node": {"leaseDurationSeconds": 1e18}}, "spec.node.leaseDurationSeconds",
                 "less than or equal to 600", id="huge-lease-duration"),
    pytest.param({"terminationGracePeriodSeconds": 2**62}, "spec.terminationGracePeriodSeconds",
                 "less than or equal to 3600", id="huge-grace-period"),
    pytest.param({"pod": {"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoExecute",
                                           "tolerationSeconds": 86401}]}},
                 "spec.pod.tolerations[0].tolerationSeconds", "less than or equal to 86400",
                 id="toleration-over-a-day"),
    # TLS
    pytest.param({"api": {"tls": {"enabled": False, "secretName": "my-cert"}}}, "spec.api.tls.secretName",
                 "needs spec.api.tls.enabled true", id="tls-secret-with-tls-off"),
    pytest.param({"api": {"tls": {"secretName": "My_Cert"}}}, "spec.api.tls.secretName", "should match",
                 id="tls-secret-not-a-dns-name"),
    pytest.param({"api": {"tls": {"secretName": "c" * 254}}}, "spec.api.tls.secretName", "253",
                 id="tls-secret-name-too-long"),
    pytest.param({"api": {"tls": {"enabled": "yes"}}}, "spec.api.tls.enabled", "boolean", id="tls-enabled-not-a-bool"),
    pytest.param({"api": {"tls": {"cert": "x"}}}, "spec.api.tls.cert", "", id="tls-unknown-field"),
    # allowFrom
    pytest.param({"api": {"allowFrom": [{}]}}, "spec.api.allowFrom",
                 "each peer needs a podSelector, a namespaceSelector or an ipBlock", id="allow-from-empty-peer"),
    pytest.param({"api": {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}]}},
                 "spec.api.allowFrom", "an ipBlock peer takes no podSelector or namespaceSelector",
                 id="allow-from-ip-block-and-selector"),
    pytest.param({"api": {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}},
                 "spec.api.allowFrom", "ipBlock.cidr must be a CIDR", id="allow-from-bad-cidr"),
    pytest.param({"api": {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}},
                 "spec.api.allowFrom", "ipBlock.except must hold CIDRs strictly inside ipBlock.cidr",
                 id="allow-from-except-outside-cidr"),
    pytest.param({"api": {"allowFrom": [{"ipBlock": {"except": ["10.1.0.0/16"]}}]}},
                 "spec.api.allowFrom[0].ipBlock.cidr", "Required", id="allow-from-ip-block-without-cidr"),
    pytest.param({"api": {"allowFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}},
                 "spec.api.allowFrom", "In or NotIn needs values", id="allow-from-in-without-values"),
    pytest.param({"api": {"allowFrom": [{"namespaceSelector": {"matchExpressions": [
                     {"key": "a", "operator": "Matches", "values": ["b"]}]}}]}},
                 "spec.api.allowFrom[0].namespaceSelector.matchExpressions[0].operator", "Matches",
                 id="allow-from-unknown-operator"),
    pytest.param({"api": {"allowFrom": [{"podSelector": {}}] * 33}}, "spec.api.allowFrom", "32",
                 id="allow-from-too-many-peers"),
    pytest.param({"api": {"allowFrom": [{"podSelector": {}, "ports": [8080]}]}}, "spec.api.allowFrom[0].ports", "",
                 id="allow-from-unknown-field"),
    # resources of the managed backends
    pytest.param({"broker": {"managed": {"resources": {"requests": {"memory": "lots"}}}}},
                 "spec.broker.managed.resources.requests.memory", "lots", id="broker-resource-not-a-quantity"),
    pytest.param({"database": {"managed": {"resources": {"limit": {"memory": "1Gi"}}}}},
                 "spec.database.managed.resources.limit", "", id="database-resources-unknown-field"),
    pytest.param({"networkPolicy": {"enabled": "no"}}, "spec.networkPolicy.enabled", "boolean",
                 id="network-policy-enabled-not-a-bool"),
]

LABEL_KEY_RULE = "keys must be qualified names (prefix/name)"
RESERVED = "keys under app.kubernetes.io/ and zstack.io/ are reserved"
LABEL_VALUE_RULE = "values must be empty or letters, digits"

BAD_LABELS_AND_ANNOTATIONS = [
    pytest.param({"labels": {"bad key": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-with-a-space"),
    pytest.param({"labels": {"-team": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-starts-with-dash"),
    pytest.param({"labels": {"team.": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-ends-with-dot"),
    pytest.param({"labels": {"k" * 64: "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-name-too-long"),
    pytest.param({"labels": {"p" * 254 + "/n": "x"}}, "spec.pod.labels", LABEL_KEY_RULE,
                 id="label-key-prefix-too-long"),
    pytest.param({"labels": {"Example.com/team": "x"}}, "spec.pod.labels", LABEL_KEY_RULE,
                 id="label-key-prefix-uppercase"),
    pytest.param({"labels": {"a/b/c": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-two-slashes"),
    pytest.param({"labels": {"/team": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-empty-prefix"),
    pytest.param({"labels": {"example.com/": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-empty-name"),
    pytest.param({"labels": {"": "x"}}, "spec.pod.labels", LABEL_KEY_RULE, id="label-key-empty"),
    pytest.param({"labels": {"team": "-cloud"}}, "spec.pod.labels[team]", LABEL_VALUE_RULE,
                 id="label-value-starts-with-dash"),
    pytest.param({"labels": {"team": "cloud team"}}, "spec.pod.labels[team]", LABEL_VALUE_RULE,
                 id="label-value-with-a-space"),
    pytest.param({"labels": {"team": "v" * 64}}, "spec.pod.labels.team", "63", id="label-value-too-long"),
    pytest.param({"labels": {f"l{i}": "x" for i in range(65)}}, "spec.pod.labels", "64", id="too-many-labels"),
    pytest.param({"labels": {"app.kubernetes.io/instance": "other"}}, "spec.pod.labels", RESERVED,
                 id="reserved-label-instance"),
    pytest.param({"labels": {"app.kubernetes.io/part-of": "cloud"}}, "spec.pod.labels", RESERVED,
                 id="reserved-label-app-kubernetes-io"),
    pytest.param({"labels": {"zstack.io/cluster": "other"}}, "spec.pod.labels", RESERVED,
                 id="reserved-label-zstack-io"),
    pytest.param({"annotations": {"bad key": "x"}}, "spec.pod.annotations",
                 "spec.pod.annotations: keys must be qualified names (prefix/name)", id="annotation-key-with-a-space"),
    pytest.param({"annotations": {"example.com/a/b": "x"}}, "spec.pod.annotations",
                 "spec.pod.annotations: keys must be qualified names", id="annotation-key-two-slashes"),
    pytest.param({"annotations": {"a" * 64: "x"}}, "spec.pod.annotations",
                 "spec.pod.annotations: keys must be qualified names", id="annotation-key-name-too-long"),
    pytest.param({"annotations": {f"a{i}": "x" * 60_000 for i in range(5)}}, "spec.pod.annotations",
                 "keys and values together must be at most 256 KiB", id="annotations-over-256KiB"),
    pytest.param({"annotations": {"big": "x" * 262_145}}, "spec.pod.annotations.big", "262144",
                 id="annotation-value-over-256KiB"),
]


@pytest.mark.parametrize(("spec", "field", "says"), BAD_SPECS)
def test_bad_spec_is_rejected_naming_the_field(ns: Namespace, spec: dict[str, Any], field: str, says: str) -> None:
    expect_rejected(ns, spec, field, says)


@pytest.mark.parametrize(("pod", "field", "says"), BAD_LABELS_AND_ANNOTATIONS)
def test_bad_pod_labels_and_annotations_are_rejected_naming_the_field(ns: Namespace, pod: dict[str, Any],
                                                                       field: str, says: str) -> None:
    expect_rejected(ns, {"pod": pod}, field, says, verb="create")  # create: no 256 KiB copy in an annotation


def test_a_name_too_long_for_the_children_is_rejected(ns: Namespace) -> None:
    proc = ns.apply({}, name="c" * 41)
    assert proc.returncode != 0 and "metadata.name: at most 40 characters" in proc.stdout + proc.stderr
    assert ns.apply({}, name="c" * 40).returncode == 0


# ---- the Lease rule agrees with the MN's own check -----------------------------------------------


def test_lease_rule_examples(ns: Namespace) -> None:
    expect_rejected(ns, {"node": {"heartbeatIntervalSeconds": 2, "leaseDurationSeconds": 3}},
                    "spec.node.leaseDurationSeconds")
    expect_accepted(ns, {"node": {"heartbeatIntervalSeconds": 1, "leaseDurationSeconds": 5}})


def mn_accepts(interval: float, timeout: float, lease: float) -> bool:
    """What zstack-node itself says of these settings in a pod (Lease membership on)."""
    settings = Settings(broker_url="amqp://broker/", database_url="postgresql://db/zstack", kubernetes="on",
                        pod_name="x", heartbeat_interval=interval, heartbeat_timeout=timeout, lease_duration=lease)
    try:
        settings.validate()
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize(
    ("interval", "lease"),
    [(1, 5), (2, 3), (1, 2), (1, 3), (0.5, 2.1), (3, 6), (3, 7), (0.1, 1), (0.1, 1.2), (1.5, 3.5), (10, 20), (60, 100)],
    ids=lambda value: f"{value}s",
)
def test_lease_rule_matches_the_mn(ns: Namespace, interval: float, lease: float) -> None:
    """The API server accepts exactly the (interval, lease) pairs zstack-node accepts."""
    timeout = max(4.0, 2 * interval)  # the timeout rule is not under test here
    spec = {"node": {"heartbeatIntervalSeconds": interval, "heartbeatTimeoutSeconds": timeout,
                     "leaseDurationSeconds": lease}}
    if mn_accepts(interval, timeout, lease):
        expect_accepted(ns, spec)
    else:
        expect_rejected(ns, spec, "spec.node.leaseDurationSeconds", "longer than the interval")


# ---- kubectl explain, scale and get --------------------------------------------------------------


def test_explain_documents_the_broker(crd: KubeCluster) -> None:
    def explained() -> str | None:
        proc = crd.kubectl("explain", "zsc.spec.broker", check=False)
        return proc.stdout if "set exactly one of managed" in proc.stdout else None

    out = wait_for("kubectl explain to show the broker's description", explained, timeout=60, interval=0.5)
    assert "managed\t<Object>" in out and "external\t<Object>" in out
    assert "RabbitMQ" in out
    external = crd.kubectl("explain", "zsc.spec.broker.external.secretRef").stdout
    assert "amqp://" in external and "name\t<string> -required-" in external


def test_managed_storage_cannot_change_once_created(ns: Namespace) -> None:
    expect_accepted(ns, {"database": {"managed": {"storage": {"size": "1Gi"}}}})
    proc = ns.apply({"database": {"managed": {"storage": {"size": "2Gi"}}}})
    assert proc.returncode != 0
    assert "spec.database.managed.storage: Invalid value" in proc.stderr and "resize the PVC" in proc.stderr
    expect_accepted(ns, {"replicas": 5, "database": {"managed": {"storage": {"size": "1Gi"}}}})


@pytest.mark.parametrize("backend", ["broker", "database"])
def test_a_managed_backend_cannot_become_external_in_place(ns: Namespace, backend: str) -> None:
    expect_accepted(ns, {})
    switch = [{"op": "remove", "path": f"/spec/{backend}/managed"},
              {"op": "add", "path": f"/spec/{backend}/external", "value": {"secretRef": {"name": "mine"}}}]
    proc = ns.kubectl("patch", "zsc", "demo", "--type=json", "-p", json.dumps(switch), check=False)
    assert proc.returncode != 0
    assert f"spec.{backend}: a managed" in proc.stderr and "Back up its data" in proc.stderr
    assert "managed" in ns.get()["spec"][backend]


def test_scale_subresource_sets_spec_replicas(ns: Namespace) -> None:
    expect_accepted(ns, {})
    out = ns.kubectl("scale", "zsc/demo", "--replicas=5").stdout
    assert "scaled" in out
    assert ns.get()["spec"]["replicas"] == 5


def test_get_prints_the_columns(ns: Namespace) -> None:
    expect_accepted(ns, {})
    header, row = ns.kubectl("get", "zsc").stdout.splitlines()
    assert header.split() == ["NAME", "REPLICAS", "READY", "RING", "BROKER", "DATABASE", "STATUS", "AGE"]
    assert row.split()[:2] == ["demo", "3"]


def test_the_zstack_category_lists_it(ns: Namespace) -> None:
    expect_accepted(ns, {})
    assert ns.kubectl("get", "zstack", "-o", "name").stdout.split() == ["zstackcluster.zstack.io/demo"]
