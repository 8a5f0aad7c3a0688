"""charts/zstack-operator without a cluster: helm lint, helm template for every toggle, the values schema, and
the files it shares with the rest of the tree (CRDs, dashboards)."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
import yaml

from tests.fixtures.chart import CHART, REPO, helm, render, values_args
from tests.fixtures.podsecurity import pod_templates, restricted_violations

# Every optional template turned on (a PDB needs two replicas; the two monitors exclude each other).
ALL_TOGGLES: dict[str, Any] = {
    "replicaCount": 2,
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "dashboards": {"enabled": True, "namespace": "monitoring"},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
}
ALL_TOGGLES_POD_MONITOR = {**ALL_TOGGLES, "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
DIGEST = "sha256:" + "0123456789abcdef" * 4


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples granted by a list of RBAC rules."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def named(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The one object of `docs` called `name`."""
    (doc,) = [d for d in docs if d["metadata"]["name"] == name]
    return doc


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs)["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# ---- one source of truth -----------------------------------------------------------------------------


@pytest.mark.parametrize("folder, pattern", [("crds", "*.yaml"), ("dashboards", "*.json")])
def test_chart_copies_equal_the_top_level_files(folder: str, pattern: str) -> None:
    top = sorted(p.name for p in (REPO / folder).glob(pattern))
    assert top, f"{folder}/{pattern} is empty"
    chart = sorted(p.name for p in (CHART / folder).glob(pattern))
    assert chart == top, f"charts/zstack-operator/{folder}/ must equal {folder}/{pattern}: run `make chart-files`"
    for name in top:
        assert (CHART / folder / name).read_bytes() == (REPO / folder / name).read_bytes(), (
            f"charts/zstack-operator/{folder}/{name} differs from {folder}/{name}: run `make chart-files`")


def test_chart_version_follows_the_project() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version


# ---- lint and template ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{}, ALL_TOGGLES, ALL_TOGGLES_POD_MONITOR, NAMESPACED],
                         ids=["defaults", "all-toggles", "all-toggles-pod-monitor", "namespaced"])
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    proc = helm("lint", "--strict", str(CHART), *values_args(values), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_defaults_render_a_locked_down_operator_watching_every_namespace() -> None:
    docs = render()
    kinds = by_kind(docs)
    assert set(kinds) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                          "Deployment", "Service", "NetworkPolicy"}
    container = operator_container(docs)
    assert container["command"] == ["zstack-operator"]
    assert "--all-namespaces" in container["args"] and "--leader-election" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["serviceAccountName"] == "zstack-operator"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    (service,) = kinds["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"] == kinds["Deployment"][0]["spec"]["selector"]["matchLabels"]


def test_every_toggle_renders_its_object() -> None:
    kinds = by_kind(render(values=ALL_TOGGLES))
    for kind in ("ServiceMonitor", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"):
        assert kind in kinds, f"{kind} missing with every toggle on"
    (monitor,) = kinds["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (pod_monitor,) = by_kind(render(values=ALL_TOGGLES_POD_MONITOR))["PodMonitor"]
    assert pod_monitor["metadata"]["labels"]["release"] == "prom"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["spec"]["selector"] == kinds["Deployment"][0]["spec"]["selector"]
    (dashboards,) = kinds["ConfigMap"]
    assert dashboards["metadata"]["namespace"] == "monitoring"
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted(p.name for p in (REPO / "dashboards").glob("*.json"))
    assert sorted(dashboards["data"]) == files
    for name, text in dashboards["data"].items():
        assert json.loads(text) == json.loads((REPO / "dashboards" / name).read_text())
    (policy,) = kinds["NetworkPolicy"]
    assert policy["spec"]["ingress"][0]["from"] == ALL_TOGGLES["networkPolicy"]["metricsFrom"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443, 6443, 8080} <= egress_ports


ANY_ADDRESS = {"0.0.0.0/0", "::/0"}


def network_policy(values: dict[str, Any] | None = None) -> dict[str, Any]:
    (policy,) = by_kind(render(values=values))["NetworkPolicy"]
    return policy


def test_default_network_policy_lets_out_only_dns_the_api_server_and_the_mns() -> None:
    policy = network_policy()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == (
        by_kind(render())["Deployment"][0]["spec"]["selector"]["matchLabels"])
    egress = policy["spec"]["egress"]
    assert all(rule.get("ports") for rule in egress), f"an egress rule without ports allows every port: {egress}"
    peers = [peer for rule in egress for peer in rule.get("to", [])]
    assert not [p for p in peers if p.get("ipBlock", {}).get("cidr") in ANY_ADDRESS]
    dns, api_server, mns = egress
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    # A NetworkPolicy cannot select the API server by label: without apiServerCIDRs only its ports are limited.
    assert {(p["port"], p["protocol"]) for p in api_server["ports"]} == {(443, "TCP"), (6443, "TCP")}
    assert "to" not in api_server
    assert mns["to"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "zstack", "app.kubernetes.io/component": "mn"}}}]
    assert mns["ports"] == [{"port": 8080, "protocol": "TCP"}]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}] and "from" not in ingress


def test_network_policy_api_server_cidrs_and_dns_peers_are_configurable() -> None:
    cidrs = ["10.96.0.1/32", "192.168.1.10/32", "fd00:10::1/128"]
    node_local_dns = [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    values = {"networkPolicy": {"apiServerCIDRs": cidrs, "apiServerPorts": [6443], "dnsTo": node_local_dns,
                                "mnPort": 9443}}
    dns, api_server, mns = network_policy(values)["spec"]["egress"]
    assert dns["to"] == node_local_dns
    assert api_server == {"ports": [{"port": 6443, "protocol": "TCP"}],
                          "to": [{"ipBlock": {"cidr": cidr}} for cidr in cidrs]}
    assert mns["ports"] == [{"port": 9443, "protocol": "TCP"}]
    # An explicit 0.0.0.0/0 is the user's choice, and it shows.
    everywhere = network_policy({"networkPolicy": {"apiServerCIDRs": ["0.0.0.0/0"]}})["spec"]["egress"][1]
    assert everywhere["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    assert "NetworkPolicy" not in by_kind(render(values={"networkPolicy": {"enabled": False}}))


# Every combination of values the chart is tested with, for the checks that concern every pod template.
VALUE_SETS = {"defaults": {}, "all-toggles": ALL_TOGGLES, "all-toggles-pod-monitor": ALL_TOGGLES_POD_MONITOR,
              "namespaced": NAMESPACED, "no-leader-election": {"leaderElection": {"enabled": False}},
              "no-network-policy": {"networkPolicy": {"enabled": False}},
              "digest": {"image": {"repository": "zstack-operator", "digest": DIGEST}}}


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_every_pod_template_meets_the_restricted_pod_security_standard(values: dict[str, Any]) -> None:
    templates = list(pod_templates(render(values=values)))
    assert templates, "the chart renders no pod template"
    for where, pod_spec in templates:
        assert restricted_violations(pod_spec) == [], where


def _restricted_pod() -> dict[str, Any]:
    return {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "tmp", "emptyDir": {}}]}


def _sc(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]["securityContext"]


@pytest.mark.parametrize(("change", "says"), [pytest.param(change, says, id=says) for change, says in [
    (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    (lambda p: p.update(hostPID=True), "hostPID"),
    (lambda p: p.update(hostIPC=True), "hostIPC"),
    (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}), "nfs"),
    (lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    (lambda p: p["securityContext"].update(runAsUser=0), "runAsUser is 0"),
    (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda p: _sc(p).update(seccompProfile={"type": "Unconfined"}), "Unconfined"),
    (lambda p: _sc(p).update(privileged=True), "privileged"),
    (lambda p: _sc(p).pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda p: _sc(p).update(capabilities={"drop": ["NET_RAW"]}), "drop must include ALL"),
    (lambda p: _sc(p)["capabilities"].update(add=["NET_BIND_SERVICE", "SYS_ADMIN"]), "SYS_ADMIN"),
    (lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    (lambda p: p.update(initContainers=[{"name": "init"}]), "init container 'init'"),
    (lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "kernel.msgmax"),
]])
def test_the_restricted_checker_catches_each_rule(change: Any, says: str) -> None:
    assert restricted_violations(_restricted_pod()) == []
    pod = _restricted_pod()
    change(pod)
    violations = restricted_violations(pod)
    assert any(says in v for v in violations), violations
    added = _restricted_pod()
    added["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert restricted_violations(added) == []


def test_dashboards_label_is_configurable() -> None:
    values = {"dashboards": {"enabled": True, "labels": {"grafana_dashboard": "zstack"}}}
    (configmap,) = by_kind(render(values=values))["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "zstack"
    assert configmap["metadata"]["namespace"] == "zstack-system"


def test_namespaced_watching_grants_the_same_rights_only_in_the_named_namespaces() -> None:
    cluster_wide = by_kind(render())
    namespaced = by_kind(render(values=NAMESPACED))
    everything = rule_set(named(cluster_wide["ClusterRole"], "zstack-operator")["rules"])
    crd_only = {r["metadata"]["name"]: rule_set(r["rules"]) for r in namespaced["ClusterRole"]
                if r["metadata"]["name"] != "zstack-mn"}
    assert crd_only == {"zstack-operator-crds": {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                                                 ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
                                                 ("", "namespaces", "list"), ("", "namespaces", "watch")}}
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): rule_set(r["rules"]) for r in namespaced["Role"]}
    for ns in NAMESPACED["watchNamespaces"]:
        assert roles[(ns, "zstack-operator")] | {t for t in crd_only["zstack-operator-crds"] if t[1] != "namespaces"} \
            == everything
        (binding,) = [b for b in namespaced["RoleBinding"] if b["metadata"]["namespace"] == ns]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "zstack-operator",
                                        "namespace": "zstack-system"}]
    assert roles[("zstack-system", "zstack-operator-leader-election")] == {
        ("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    args = operator_container(render(values=NAMESPACED))["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]


def test_operator_secrets_access_is_create_only() -> None:
    rules = rule_set(named(by_kind(render())["ClusterRole"], "zstack-operator")["rules"])
    assert {v for g, r, v in rules if r == "secrets"} == {"create"}, "the operator must never read Secrets"


def test_leader_election_settings_reach_the_operator() -> None:
    values = {"leaderElection": {"leaseDuration": 20, "renewDeadline": 12, "retryPeriod": 3}, "logLevel": "debug"}
    args = operator_container(render(values=values))["args"]
    for arg in ("--lease-duration=20", "--renew-deadline=12", "--retry-period=3", "--log-level=debug"):
        assert arg in args
    off = render(values={"leaderElection": {"enabled": False}})
    args = operator_container(off)["args"]
    assert "--no-leader-election" in args and not any(a.startswith("--lease-duration") for a in args)
    # No election: an upgrade must stop the old pod before the new one reconciles.
    assert by_kind(off)["Deployment"][0]["spec"]["strategy"] == {"type": "Recreate"}
    assert by_kind(render())["Deployment"][0]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_bind_address_defaults_to_every_interface() -> None:
    assert "--http-bind=0.0.0.0" in operator_container(render())["args"], "kubectl port-forward needs 0.0.0.0"
    host_network = operator_container(render(values={"metrics": {"bindAddress": "$(POD_IP)"}}))
    assert "--http-bind=$(POD_IP)" in host_network["args"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in host_network["env"]


def test_image_tag_defaults_to_the_app_version() -> None:
    assert operator_container(render())["image"] == "zstack-operator:0.1.0"
    custom = {"image": {"repository": "registry.example.com/zstack-operator", "tag": "0.2.0"}}
    assert operator_container(render(values=custom))["image"] == "registry.example.com/zstack-operator:0.2.0"


def test_image_by_digest_ignores_the_tag() -> None:
    values = {"image": {"repository": "registry.example.com:5000/team/zstack-operator", "tag": "0.2.0",
                        "digest": DIGEST}}
    image = operator_container(render(values=values))["image"]
    assert image == f"registry.example.com:5000/team/zstack-operator@{DIGEST}"
    assert operator_container(render(values={"image": {"digest": ""}}))["image"] == "zstack-operator:0.1.0"


# ---- bad values fail, naming the field ------------------------------------------------------------------


@pytest.mark.parametrize(("values", "named"), [
    ({"replicaCount": -1}, "replicaCount"),
    ({"replicas": 2}, "replicas"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"logLevel": "verbose"}, "logLevel"),
    ({"leaderElection": {"leaseDuration": "15s"}}, "leaseDuration"),
    ({"dashboards": {"labels": {"grafana_dashboard": 1}}}, "grafana_dashboard"),
    ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
    ({"leaderElection": {"renewDeadline": 15}}, "leaderElection.renewDeadline"),
    ({"leaderElection": {"retryPeriod": 10}}, "leaderElection.retryPeriod"),
    ({"replicaCount": 2, "leaderElection": {"enabled": False}}, "leaderElection.enabled"),
    ({"podDisruptionBudget": {"enabled": True}}, "podDisruptionBudget.enabled"),
    ({"replicaCount": 2, "podDisruptionBudget": {"enabled": True, "minAvailable": 2}},
     "podDisruptionBudget.minAvailable"),
    ({"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}, "pick one"),
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, "metrics.service.enabled"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"image": {"digest": "sha256:" + "0123456789ABCDEF" * 4}}, "/image/digest"),
    ({"image": {"digest": "0123456789abcdef" * 4}}, "/image/digest"),
    ({"image": {"tag": "0.1 --evil"}}, "/image/tag"),
    ({"image": {"tag": ".hidden"}}, "/image/tag"),
    ({"image": {"repository": "Registry.Example/ZStack-Operator"}}, "/image/repository"),
    ({"image": {"repository": "zstack-operator:0.1.0"}}, "/image/repository"),
    ({"networkPolicy": {"dnsTo": []}}, "/networkPolicy/dnsTo"),
    ({"networkPolicy": {"dnsTo": [{}]}}, "/networkPolicy/dnsTo/0"),
    ({"networkPolicy": {"apiServerCIDRs": ["10.0.0.1"]}}, "/networkPolicy/apiServerCIDRs/0"),
    ({"networkPolicy": {"metricsFrom": [{"ipBlock": {"cidr": "everywhere"}}]}}, "/networkPolicy/metricsFrom/0"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_bad_values_are_refused_naming_the_field(values: dict[str, Any], named: str) -> None:
    proc = helm("template", "t", str(CHART), *values_args(values), check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert named in proc.stderr, f"the error does not name {named!r}:\n{proc.stderr}"
