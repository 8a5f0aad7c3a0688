"""The children the operator builds from a spec (pure logic; the e2e tests apply them to a real API server)."""

from __future__ import annotations

from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from tests.fixtures.chart import render
from tests.fixtures.podsecurity import pod_templates, restricted_violations
from zstack_operator import tls
from zstack_operator.cluster import Cluster
from zstack_operator.credentials import broker_secret, database_secret, generated_secrets
from zstack_operator.mn import METRICS_RELABELINGS, MN_CLUSTER_ROLE, access, config_map, statefulset
from zstack_operator.reconcile import desired_children

EXTERNAL = {"broker": {"external": {"secretRef": {"name": "my-amqp", "key": "uri"}}},
            "database": {"external": {"secretRef": {"name": "my-pg", "key": "url"}}}}


def cluster(**spec: Any) -> Cluster:
    return Cluster("demo", "prod", "uid-1", 1, spec, {})


def kinds(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


def mn_container(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_every_child_is_owned_by_the_cluster_as_its_controller() -> None:
    for obj in desired_children(cluster(), {"servicemonitors": True, "podmonitors": True}):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == "uid-1" and owner["controller"] is True, obj["kind"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "zstack-operator"


def url_file_secret(objects: list[dict[str, Any]], dependency: str) -> dict[str, Any]:
    """The Secret volume behind the MN's ZSTACK_<dependency>_URL_FILE."""
    sts = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "demo-mn")
    container = mn_container(sts)
    path = env(container)[f"ZSTACK_{dependency}_URL_FILE"]
    (mount,) = [m for m in container["volumeMounts"] if path == f"{m['mountPath']}/url"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]


def test_external_mode_wires_the_users_secrets_and_runs_no_broker_or_database() -> None:
    objects = desired_children(cluster(**EXTERNAL), {})
    assert not {k for k in kinds(objects) if k[1] in ("demo-rabbitmq", "demo-postgresql")}
    values = env(mn_container(next(o for o in objects if o["kind"] == "StatefulSet")))
    assert url_file_secret(objects, "BROKER") == {"secretName": "my-amqp", "items": [{"key": "uri", "path": "url"}]}
    assert url_file_secret(objects, "DATABASE") == {"secretName": "my-pg", "items": [{"key": "url", "path": "url"}]}
    assert not {"ZSTACK_API_TOKEN", "ZSTACK_BROKER_URL", "ZSTACK_DATABASE_URL"} & set(values), \
        "a secret in the environment shows in /proc/<pid>/environ"
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-token"]["secret"] == {"secretName": "demo-api-token",
                                              "items": [{"key": "token", "path": "token"}]}
    mounts = {m["name"]: m for m in mn_container(sts)["volumeMounts"]}
    assert set(mounts) == set(volumes) and all(m["readOnly"] for m in mounts.values())
    assert values["ZSTACK_API_TOKEN_FILE"] == f"{mounts['api-token']['mountPath']}/token"
    assert [s["metadata"]["name"] for s in generated_secrets(cluster(**EXTERNAL))] == ["demo-api-token"]


def test_managed_mode_adds_both_statefulsets_and_their_generated_secrets() -> None:
    objects = desired_children(cluster(), {})
    assert {("StatefulSet", "demo-rabbitmq"), ("Service", "demo-rabbitmq"), ("StatefulSet", "demo-postgresql"),
            ("Service", "demo-postgresql")} <= kinds(objects)
    assert {s["metadata"]["name"] for s in generated_secrets(cluster())} == \
        {"demo-api-token", "demo-broker", "demo-database"}


def test_generated_urls_carry_the_generated_password_and_the_service_host() -> None:
    for secret, host in ((broker_secret(cluster()), "demo-rabbitmq.prod.svc"),
                         (database_secret(cluster()), "demo-postgresql.prod.svc")):
        data = secret["stringData"]
        url = urlsplit(data["url"])
        assert url.hostname == host and url.username == data["username"]
        assert unquote(url.password or "") == data["password"] and len(data["password"]) >= 24
    assert broker_secret(cluster())["stringData"]["password"] != broker_secret(cluster())["stringData"]["password"]


def test_the_mn_statefulset_has_probes_a_graceful_stop_and_parallel_pods() -> None:
    sts = statefulset(cluster(replicas=4, terminationGracePeriodSeconds=45, api={"port": 9090}), config_map(cluster()))
    spec = sts["spec"]
    assert spec["replicas"] == 4 and spec["podManagementPolicy"] == "Parallel" and spec["serviceName"] == "demo-mn"
    pod = spec["template"]["spec"]
    container = mn_container(sts)
    assert pod["terminationGracePeriodSeconds"] == 45 and pod["serviceAccountName"] == "demo-mn"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"] == [{"name": "http", "containerPort": 9090, "protocol": "TCP"}]
    assert "preStop" in container["lifecycle"]
    assert env(container)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_a_node_setting_change_changes_the_pod_template_so_the_mns_restart_with_it() -> None:
    def template_hash(**node: Any) -> str:
        c = cluster(node=node)
        return statefulset(c, config_map(c))["spec"]["template"]["metadata"]["annotations"]["zstack.io/config-hash"]

    assert template_hash(heartbeatTimeoutSeconds=4) == template_hash(heartbeatTimeoutSeconds=4)
    assert template_hash(heartbeatTimeoutSeconds=4) != template_hash(heartbeatTimeoutSeconds=6)
    data = config_map(cluster(node={"heartbeatIntervalSeconds": 0.5, "ringVirtualNodes": 100}))["data"]
    assert data["ZSTACK_HEARTBEAT_INTERVAL"] == "0.5" and data["ZSTACK_RING_VNODES"] == "100"


def test_pod_overrides_land_on_the_pods_but_cannot_replace_the_selector_labels() -> None:
    pod = {"nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "mn", "operator": "Exists"}],
           "labels": {"team": "cloud", "app.kubernetes.io/instance": "other"}, "annotations": {"a": "b"}}
    c = cluster(pod=pod)
    template = statefulset(c, config_map(c))["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"disk": "ssd"} and template["spec"]["tolerations"] == pod["tolerations"]
    assert template["metadata"]["labels"]["team"] == "cloud"
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
    assert template["metadata"]["annotations"]["a"] == "b"


def test_optional_children_follow_their_toggles_and_the_monitoring_crds() -> None:
    off = desired_children(cluster(podDisruptionBudget={"enabled": False}, **EXTERNAL), {})
    assert ("PodDisruptionBudget", "demo-mn") not in kinds(off)
    wanted = cluster(metrics={"serviceMonitor": True, "podMonitor": True}, **EXTERNAL)
    assert not {"ServiceMonitor", "PodMonitor"} & {k for k, _ in kinds(desired_children(wanted, {}))}
    with_crds = desired_children(wanted, {"servicemonitors": True, "podmonitors": True})
    assert {("ServiceMonitor", "demo-mn"), ("PodMonitor", "demo-mn")} <= kinds(with_crds)


def test_both_monitors_label_every_mn_series_with_its_cluster_and_keep_the_bus_service_label() -> None:
    wanted = cluster(metrics={"serviceMonitor": True, "podMonitor": True}, **EXTERNAL)
    children = desired_children(wanted, {"servicemonitors": True, "podmonitors": True})
    monitors = {o["kind"]: o["spec"] for o in children if o["kind"] in ("ServiceMonitor", "PodMonitor")}
    [service_endpoint] = monitors["ServiceMonitor"]["endpoints"]
    [pod_endpoint] = monitors["PodMonitor"]["podMetricsEndpoints"]
    to_cluster = {"sourceLabels": ["__meta_kubernetes_pod_label_zstack_io_cluster"], "targetLabel": "zstack_cluster"}
    assert service_endpoint["relabelings"] == pod_endpoint["relabelings"] == METRICS_RELABELINGS == [to_cluster]
    # The ServiceMonitor's own `service` target label must not rename the MN's `service` (bus service) label.
    assert service_endpoint["honorLabels"] is True
    assert (service_endpoint["port"], pod_endpoint["port"]) == ("http", "http")


def test_mn_access_binds_the_fixed_cluster_role_in_the_cluster_namespace_only() -> None:
    objects = {o["kind"]: o for o in access(cluster(), "zstack-mn")}
    assert set(objects) == {"ServiceAccount", "RoleBinding"}, "the operator writes no Role of its own"
    binding = objects["RoleBinding"]
    assert binding["metadata"]["namespace"] == "prod"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "zstack-mn"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-mn", "namespace": "prod"}]
    assert objects["ServiceAccount"]["metadata"]["name"] == "demo-mn"
    # roleRef is immutable: binding another role must be another object, never a failing patch.
    other = {o["kind"]: o for o in access(cluster(), "zstack-mn-other")}["RoleBinding"]
    assert other["metadata"]["name"] != binding["metadata"]["name"]


def test_the_chart_grants_the_mns_exactly_what_the_node_manifest_does() -> None:
    text = resources.files("zstack_node").joinpath("manifests/mn-rbac.yaml").read_text()
    (node_role,) = [d for d in yaml.safe_load_all(text) if d["kind"] == "ClusterRole"]
    (chart_role,) = [d for d in render() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == MN_CLUSTER_ROLE]
    assert chart_role["rules"] == node_role["rules"]
    assert node_role["metadata"]["name"] == MN_CLUSTER_ROLE


def test_network_policies_guard_every_pod_by_default_and_go_when_turned_off() -> None:
    managed = {"broker": {"managed": {}}, "database": {"managed": {}}}
    policies = {o["metadata"]["name"]: o for o in desired_children(cluster(**managed), {})
                if o["kind"] == "NetworkPolicy"}
    assert sorted(policies) == ["demo-mn", "demo-postgresql", "demo-rabbitmq"]
    external = [o for o in desired_children(cluster(**EXTERNAL), {}) if o["kind"] == "NetworkPolicy"]
    assert [o["metadata"]["name"] for o in external] == ["demo-mn"]
    off = desired_children(cluster(networkPolicy={"enabled": False}, **managed), {})
    assert not [o for o in off if o["kind"] == "NetworkPolicy"]


def test_an_exposed_api_accepts_from_anywhere_unless_allow_from_says_otherwise() -> None:
    def mn_rule(**spec: Any) -> dict[str, Any]:
        (policy,) = [o for o in desired_children(cluster(**spec, **EXTERNAL), {})
                     if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "demo-mn"]
        (rule,) = policy["spec"]["ingress"]
        return rule

    assert "from" not in mn_rule(api={"serviceType": "LoadBalancer"}), "a LoadBalancer's clients come from outside"
    assert mn_rule()["from"] == [{"namespaceSelector": {}}]
    peers = [{"ipBlock": {"cidr": "10.1.0.0/16"}}]
    narrowed = mn_rule(api={"serviceType": "NodePort", "allowFrom": peers})["from"]
    assert narrowed[0] == peers[0] and narrowed[1]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "zstack-operator"}


def test_tls_is_on_by_default_with_the_generated_secret_or_the_users() -> None:
    sts = next(o for o in desired_children(cluster(**EXTERNAL), {}) if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-tls"]["secret"]["secretName"] == "demo-api-tls"
    mn = mn_container(sts)
    values = env(mn)
    mounts = {m["name"]: m["mountPath"] for m in mn["volumeMounts"]}
    assert values["ZSTACK_TLS_CERT_FILE"] == f"{mounts['api-tls']}/tls.crt"
    assert values["ZSTACK_TLS_KEY_FILE"] == f"{mounts['api-tls']}/tls.key"
    assert mn["readinessProbe"]["httpGet"]["scheme"] == mn["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    mine = next(o for o in desired_children(cluster(api={"tls": {"secretName": "mine"}}, **EXTERNAL), {})
                if o["kind"] == "StatefulSet")
    assert {v["name"]: v for v in mine["spec"]["template"]["spec"]["volumes"]}["api-tls"]["secret"][
        "secretName"] == "mine"
    plain = next(o for o in desired_children(cluster(api={"tls": {"enabled": False}}, **EXTERNAL), {})
                 if o["kind"] == "StatefulSet")
    assert "ZSTACK_TLS_CERT_FILE" not in env(mn_container(plain))
    assert mn_container(plain)["readinessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_the_generated_certificate_names_the_api_service_and_every_mn_pod() -> None:
    from cryptography import x509

    issued = tls.issue(cluster())
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert {"demo-api.prod.svc", "demo-api.prod.svc.cluster.local", "*.demo-mn.prod.svc", "localhost"} <= set(names)
    ca = x509.load_pem_x509_certificate(issued.ca_pem)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" in issued.key_pem and b"PRIVATE KEY" not in issued.ca_pem
    secret = tls.secret(cluster(), issued)
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert tls.ca_config_map(cluster(), issued)["data"]["ca.crt"] == issued.ca_pem.decode()


def test_every_pod_the_operator_makes_passes_restricted() -> None:
    managed = {"broker": {"managed": {}}, "database": {"managed": {}}}
    objects = desired_children(cluster(**managed), {})
    templates = list(pod_templates(objects))
    assert len(templates) == 3, "the MN, RabbitMQ and PostgreSQL StatefulSets"
    for name, pod in templates:
        assert restricted_violations(pod) == [], name
    for sts in (o for o in objects if o["kind"] == "StatefulSet"):
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], \
            f"{sts['metadata']['name']} has no default resources"
    mine = {"requests": {"cpu": "2", "memory": "4Gi"}}
    custom = desired_children(cluster(broker={"managed": {"resources": mine}}, database={"managed": {}}), {})
    rabbitmq = next(o for o in custom if o["metadata"]["name"] == "demo-rabbitmq" and o["kind"] == "StatefulSet")
    assert rabbitmq["spec"]["template"]["spec"]["containers"][0]["resources"] == mine
