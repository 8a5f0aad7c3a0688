"""The chart's RBAC as `helm template` renders it: no wildcard anywhere, and Leases, Roles and bindings only
where least privilege allows (the operator's leader Lease in its own namespace; binding the MNs' ClusterRole).

What the API server makes of these rules is asked with `kubectl auth can-i` in tests/operator/test_security.py
(every namespace) and tests/chart/test_install.py (watchNamespaces).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.chart import render

NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
RBAC_GROUP = "rbac.authorization.k8s.io"


def rules_by_role(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rules of every Role and ClusterRole, by (kind, namespace, name)."""
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d["rules"]
            for d in docs if d["kind"] in ("Role", "ClusterRole")}


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["every-namespace", "namespaced"])
def test_no_rule_has_a_wildcard(values: dict[str, Any]) -> None:
    for role, rules in rules_by_role(render(values=values)).items():
        for rule in rules:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in "".join(rule.get(key, [])), f"{role} grants a wildcard in {key}: {rule}"


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["every-namespace", "namespaced"])
def test_leases_roles_and_bindings_only_where_least_privilege_allows(values: dict[str, Any]) -> None:
    docs = render(values=values)
    for (kind, namespace, name), rules in rules_by_role(docs).items():
        for rule in rules:
            resources = set(rule["resources"])
            if "leases" in resources:
                if name == "zstack-mn":  # the MNs' own rights; the operator never holds them
                    continue
                assert (kind, namespace, name) == ("Role", "zstack-system", "zstack-operator-leader-election"), \
                    f"{kind} {namespace}/{name} grants Leases: {rule}"
                assert set(rule["verbs"]) == {"get", "create", "update"}
            assert not resources & {"roles", "clusterrolebindings"}, f"{name} may write roles: {rule}"
            if "rolebindings" in resources:
                assert set(rule["verbs"]) <= {"create", "patch"} and "resourceNames" not in rule, rule
            if "clusterroles" in resources:
                assert rule["verbs"] == ["bind"] and rule["resourceNames"] == ["zstack-mn"], \
                    f"{name} may bind more than the MNs' ClusterRole: {rule}"
            assert not {"escalate", "impersonate"} & set(rule["verbs"]), f"{name}: {rule}"
    # The MNs' ClusterRole is bound by the operator per ZStackCluster namespace, never cluster-wide.
    for doc in docs:
        if doc["kind"] == "ClusterRoleBinding":
            assert doc["roleRef"]["name"] != "zstack-mn", "the MNs' rights would reach every namespace"


def test_mns_cluster_role_name_reaches_the_operator() -> None:
    docs = render(values={"rbac": {"mnClusterRole": "zstack-mn-blue"}})
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"}
    assert "zstack-mn-blue" in names and "zstack-mn" not in names
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert "--mn-cluster-role=zstack-mn-blue" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    (operator_role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "zstack-operator"]
    binds = [r for r in operator_role["rules"] if r["resources"] == ["clusterroles"]]
    assert binds == [{"apiGroups": [RBAC_GROUP], "resources": ["clusterroles"], "verbs": ["bind"],
                      "resourceNames": ["zstack-mn-blue"]}]
