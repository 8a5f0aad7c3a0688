"""Least privilege on the real API server: what the operator's and the MNs' ServiceAccounts may do (asked with
`kubectl auth can-i`), Pod Security "restricted" for every pod the operator makes, and its NetworkPolicies.

The operator runs here as the chart's ServiceAccount with the chart's cluster-wide RBAC (conftest.py); the
namespaced install mode is checked the same way in tests/chart/test_install.py.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.k8s.conftest import wait_for
from tests.operator.conftest import (
    MN_CLUSTER_ROLE,
    OPERATOR_NS,
    OPERATOR_SA,
    TIMEOUT,
    OperatorProcess,
    Zsc,
)
from zstack_devcluster import images as builds
from zstack_devcluster.services import PostgreSQL, RabbitMQ

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

OPERATOR = f"{OPERATOR_NS}/{OPERATOR_SA}"


def test_the_operator_cannot_touch_leases_roles_or_secrets_beyond_its_children(operator: OperatorProcess,
                                                                               zsc: Zsc) -> None:
    zsc.apply()
    zsc.wait_condition("Ready")  # the MNs hold their Leases through the binding the operator made
    can = zsc.cluster.can_i
    # Leases: the control plane's leader election lives in kube-system; the MNs' Leases in the cluster's.
    for verb in ("get", "update", "create", "delete"):
        assert not can(OPERATOR, verb, "leases", "kube-system"), f"the operator can {verb} kube-system Leases"
        assert not can(OPERATOR, verb, "leases", zsc.ns), f"the operator can {verb} the MNs' Leases"
    # No Roles of its own making, no escalation, no binding any role but the MNs'.
    assert not can(OPERATOR, "create", "roles", zsc.ns)
    assert not can(OPERATOR, "escalate", "roles", zsc.ns)
    assert not can(OPERATOR, "create", "clusterrolebindings")
    assert not can(OPERATOR, "bind", "clusterroles/cluster-admin", zsc.ns)
    assert not can(OPERATOR, "bind", "clusterroles/admin", zsc.ns)
    assert can(OPERATOR, "bind", f"clusterroles/{MN_CLUSTER_ROLE}", zsc.ns)
    # Secrets: created, never read.
    assert not can(OPERATOR, "list", "secrets", "kube-system")
    assert not can(OPERATOR, "get", "secrets", zsc.ns)
    assert can(OPERATOR, "create", "secrets", zsc.ns)
    # The binding it made is to the MNs' ClusterRole, and the API server let it make no other: a RoleBinding
    # to cluster-admin is refused for want of "bind" (RBAC's escalation check).
    binding = zsc.get("rolebinding", f"demo-mn-{MN_CLUSTER_ROLE}")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": MN_CLUSTER_ROLE}
    assert zsc.get("role", "demo-mn") is None, "the operator made a Role"


def test_the_operator_cannot_bind_cluster_admin_even_when_it_tries(operator: OperatorProcess, zsc: Zsc) -> None:
    sa = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
    binding = ('{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"RoleBinding","metadata":{"name":"grab"},'
               '"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"cluster-admin"},'
               f'"subjects":[{{"kind":"ServiceAccount","name":"default","namespace":"{zsc.ns}"}}]}}')
    refused = zsc.cluster.kubectl("-n", zsc.ns, "create", f"--as={sa}", "-f", "-", input=binding, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr, refused.stdout + refused.stderr
    assert zsc.get("rolebinding", "grab") is None


def test_mns_may_use_leases_in_their_own_namespace_only(operator: OperatorProcess, zsc: Zsc) -> None:
    zsc.apply(replicas=1)
    mn = f"{zsc.ns}/demo-mn"
    wait_for("the MN ServiceAccount's binding", lambda: zsc.get("rolebinding", f"demo-mn-{MN_CLUSTER_ROLE}"), TIMEOUT)
    can = zsc.cluster.can_i
    for verb in ("get", "list", "watch", "create", "update", "delete"):
        assert can(mn, verb, "leases", zsc.ns), f"an MN cannot {verb} Leases in its namespace"
    assert not can(mn, "patch", "leases", zsc.ns), "an MN never patches a Lease: no right to"
    assert not can(mn, "update", "leases", "kube-system")
    assert not can(mn, "update", "leases", "default")
    assert can(mn, "get", "pods", zsc.ns)
    for verb, resource in (("list", "secrets"), ("get", "secrets"), ("create", "pods"), ("delete", "pods"),
                           ("list", "pods"), ("create", "rolebindings")):
        assert not can(mn, verb, resource, zsc.ns), f"an MN can {verb} {resource}"


def _policy(zsc: Zsc, name: str) -> dict[str, Any]:
    return wait_for(f"NetworkPolicy {name}", lambda: zsc.get("networkpolicy", name), TIMEOUT, interval=0.5)


def test_managed_pods_pass_restricted_and_accept_only_their_mns(operator: OperatorProcess, zsc: Zsc) -> None:
    labels = zsc.cluster.kubectl("get", "namespace", zsc.ns, "-o", "jsonpath={.metadata.labels}").stdout
    assert '"pod-security.kubernetes.io/enforce":"restricted"' in labels
    zsc.apply(replicas=1, api={"allowFrom": None},  # the default
              broker={"external": None, "managed": {"image": builds.image_name("rabbitmq")}},
              database={"external": None, "managed": {"image": builds.image_name("postgresql")}})
    # A pod that failed "restricted" would never exist: the API server refuses it at admission.
    for pod in ("demo-mn-0", "demo-rabbitmq-0", "demo-postgresql-0"):
        wait_for(f"pod {pod} admitted under restricted", lambda pod=pod: zsc.get("pod", pod), TIMEOUT, interval=0.5,
                 info=lambda: zsc.read("get", "events", "--field-selector", "reason=FailedCreate"))
    mn_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "demo",
                                               "app.kubernetes.io/component": "mn"}}}
    for name, port in (("demo-rabbitmq", 5672), ("demo-postgresql", 5432)):
        spec = _policy(zsc, name)["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["ingress"] == [{"from": [mn_pods], "ports": [{"port": port, "protocol": "TCP"}]}], name
    api = _policy(zsc, "demo-mn")["spec"]
    assert api["ingress"][0]["from"] == [{"namespaceSelector": {}}], "the API's default: any pod in the cluster"


def test_api_allow_from_narrows_the_mn_policy_and_turning_policies_off_deletes_them(operator: OperatorProcess,
                                                                                   zsc: Zsc) -> None:
    clients = {"namespaceSelector": {"matchLabels": {"team": "cloud"}}}
    zsc.apply(replicas=1, api={"port": zsc.port, "allowFrom": [clients]})
    rule = _policy(zsc, "demo-mn")["spec"]["ingress"][0]
    assert rule["from"][0] == clients
    assert rule["from"][1]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "zstack-operator"}, \
        "the operator must still reach the MNs' rings"
    assert rule["ports"] == [{"port": zsc.port, "protocol": "TCP"}]
    zsc.patch({"spec": {"networkPolicy": {"enabled": False}}})
    wait_for("the MN NetworkPolicy to go", lambda: zsc.get("networkpolicy", "demo-mn") is None, TIMEOUT)


def test_no_log_holds_a_password_or_token(operator: OperatorProcess, zsc: Zsc, rabbitmq: RabbitMQ,
                                          postgres: PostgreSQL) -> None:
    zsc.apply(replicas=2)
    zsc.wait_condition("Ready")
    token = base64.b64decode(zsc.get("secret", "demo-api-token")["data"]["token"]).decode()
    for pod in ("demo-mn-0", "demo-mn-1"):  # good and bad tokens through each MN's authentication
        base = zsc.url(pod, "/v1/hosts")
        for bearer, expect in ((token, 200), (token[::-1], 401)):
            request = urllib.request.Request(base, headers={"Authorization": f"Bearer {bearer}"})
            try:
                with urllib.request.urlopen(request, timeout=10, context=zsc.ssl_context()) as answer:
                    status = answer.status
            except urllib.error.HTTPError as err:
                status = err.code
            assert status == expect, f"{pod}: {status}"
    secrets = {"the API token": token, "the broker password": rabbitmq.password,
               "the database password": urlsplit(postgres.url).password or ""}
    logs = {"the operator": operator.log(), "kubectl describe zsc": zsc.describe(),
            "events": zsc.read("get", "events", "-o", "yaml")}
    for pod in ("demo-mn-0", "demo-mn-1"):
        logs[pod] = zsc.log(pod)
    for server in (rabbitmq, postgres):
        for path in server.log_files():
            logs[str(path)] = path.read_text(errors="replace")
    assert all(secrets.values()) and all(logs.values()), (secrets.keys(), {k: len(v) for k, v in logs.items()})
    for what, value in secrets.items():
        for where, text in logs.items():
            assert value not in text, f"{what} appears in the log of {where}"
