"""`helm install` of charts/zstack-operator on the devcluster, watching one namespace: the operator pod runs in
a container from our image, the example ZStackCluster becomes Ready, and `helm uninstall` keeps the CRD.
The chart's values for this node (our image, what its NetworkPolicy must let through) are `make demo`'s.

(`make demo`, tested in tests/e2e/test_user_path.py, installs the same chart watching every namespace.)
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.chart import CHART, REPO, helm
from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import wait_for
from zstack_devcluster import demo
from zstack_devcluster import images as builds

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

EXAMPLE = REPO / "examples" / "zstackcluster-devcluster.yaml"
MN_SELECTOR = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=mn"


@dataclass
class Release:
    """A release watching `watched` only; `unwatched` holds a ZStackCluster it must leave alone."""

    cluster: KubeCluster
    name: str
    namespace: str
    watched: str
    unwatched: str
    install_output: str

    @property
    def mn_cluster_role(self) -> str:
        return f"{self.name}-mn"

    @property
    def fullname(self) -> str:
        return f"{self.name}-zstack-operator"

    def get(self, *args: str) -> Any:
        proc = self.cluster.kubectl("get", *args, "-o", "json", "--ignore-not-found", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None

    def operator_pods(self) -> list[dict[str, Any]]:
        pods = self.get("pods", "-n", self.namespace, "-l", f"app.kubernetes.io/instance={self.name}")
        return pods["items"] if pods else []


def _apply_example(cluster: KubeCluster, namespace: str, broker: str, database: str) -> None:
    secrets = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "stringData": {"url": url}}
               for name, url in (("demo-external-broker", broker), ("demo-external-database", database))]
    example = yaml.safe_load(EXAMPLE.read_text())
    example["metadata"]["namespace"] = namespace
    example["spec"].update(image=builds.image_name("node"), imagePullPolicy="Never")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([*secrets, example]))


@pytest.fixture(scope="module")
def release(devcluster: KubeCluster, postgres: Any, rabbitmq: Any, pods_reach: Callable[[str], str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    rel = Release(devcluster, f"zso-{suffix}", f"zso-{suffix}", f"zsw-{suffix}", f"zsu-{suffix}", "")
    for ns in (rel.watched, rel.unwatched, rel.namespace):
        devcluster.kubectl("create", "namespace", ns)
        # The operator's pod and every pod it makes must pass Pod Security "restricted".
        devcluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    postgres.start()
    rabbitmq.start()
    database = postgres.create_database(f"zsw_{suffix}")
    vhost = f"zsw-{suffix}"
    urls = (pods_reach(rabbitmq.add_vhost(vhost)), pods_reach(postgres.url_for(database)))
    values = Path(tmp_path_factory.mktemp("chart")) / "values.yaml"
    values.write_text(yaml.safe_dump(demo.chart_values(devcluster.root)))
    try:
        rel.install_output = helm(
            "install", rel.name, str(CHART), "--namespace", rel.namespace, "--wait", "--timeout", "3m",
            "--values", str(values), "--set-json", f"watchNamespaces={json.dumps([rel.watched])}",
            # The default name belongs to `make demo`'s release, which may share this devcluster.
            "--set-string", f"rbac.mnClusterRole={rel.mn_cluster_role}",
            kubeconfig=devcluster.kubeconfig).stdout
        for ns in (rel.watched, rel.unwatched):
            _apply_example(devcluster, ns, *urls)
        yield rel
    finally:
        helm("uninstall", rel.name, "--namespace", rel.namespace, "--wait", kubeconfig=devcluster.kubeconfig,
             check=False)
        for ns in (rel.watched, rel.unwatched):
            devcluster.kubectl("-n", ns, "delete", "zsc,statefulset", "--all", "--wait=false", check=False)
        devcluster.kubectl("-n", rel.watched, "wait", "--for=delete", "pod", "-l", MN_SELECTOR, "--timeout=90s",
                           check=False)
        for ns in (rel.watched, rel.unwatched, rel.namespace):
            devcluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        postgres.drop_database(database)
        rabbitmq.delete_vhost(vhost)


def test_install_runs_the_operator_pod_in_a_container_of_our_image(release: Release) -> None:
    notes = release.install_output.split("NOTES:", 1)[1]
    assert "zstack-operator:0.1.0" in notes and release.watched in notes and "kubectl get zsc" in notes
    (pod,) = release.operator_pods()
    assert pod["spec"]["serviceAccountName"] == release.fullname
    (container,) = pod["status"]["containerStatuses"]
    assert container["image"] == builds.image_name("operator"), container
    assert container["containerID"].startswith("containerd://"), container
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True", pod["status"]
    ip = pod["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:8081/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "zstack_operator_leader 1.0" in metrics, "the only replica must lead"
    log = release.cluster.kubectl("-n", release.namespace, "logs", pod["metadata"]["name"]).stdout
    assert "leading as" in log
    assert "Not enough permissions" not in log, log


def test_the_example_becomes_ready_in_the_watched_namespace_only(release: Release) -> None:
    def ready() -> dict[str, Any] | None:
        cr = release.get("zsc", "demo", "-n", release.watched) or {}
        status = cr.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        return cr if conditions.get("Ready") == "True" and status.get("ring", {}).get("summary") == "3/3" else None

    cr = wait_for("the example ZStackCluster to be Ready with ring 3/3", ready, timeout=180, interval=1)
    assert cr["status"]["readyReplicas"] == 3
    table = release.cluster.kubectl("-n", release.watched, "get", "zsc", "demo").stdout
    assert "3/3" in table and "Ready" in table
    untouched = release.get("zsc", "demo", "-n", release.unwatched)
    assert not untouched.get("status"), "the operator wrote the status of a cluster it does not watch"
    assert release.get("statefulset", "demo-mn", "-n", release.unwatched) is None


def test_rbac_is_least_privilege_and_only_in_the_watched_namespace(release: Release) -> None:
    release.get("zsc", "demo", "-n", release.watched)  # the example exists: its MN account is bound by now
    wait_for("the MNs' RoleBinding", lambda: release.get(
        "rolebinding", f"demo-mn-{release.mn_cluster_role}", "-n", release.watched), timeout=60)
    can = release.cluster.can_i
    operator = f"{release.namespace}/{release.fullname}"
    assert can(operator, "patch", "statefulsets", release.watched)
    assert can(operator, "bind", f"clusterroles/{release.mn_cluster_role}", release.watched)
    for ns in (release.unwatched, "kube-system", "default"):
        assert not can(operator, "patch", "statefulsets", ns), f"the operator can write StatefulSets in {ns}"
        assert not can(operator, "create", "secrets", ns)
        assert not can(operator, "bind", f"clusterroles/{release.mn_cluster_role}", ns)
    for verb in ("get", "update", "create"):
        assert not can(operator, verb, "leases", "kube-system")
        assert not can(operator, verb, "leases", release.watched)
        assert can(operator, verb, "leases", release.namespace), "the leader Lease lives in the release namespace"
    assert not can(operator, "list", "secrets", "kube-system")
    for verb in ("create", "escalate"):
        assert not can(operator, verb, "roles", release.watched)
    assert not can(operator, "bind", "clusterroles/cluster-admin", release.watched)

    mn = f"{release.watched}/demo-mn"
    assert can(mn, "update", "leases", release.watched)
    for ns in (release.unwatched, release.namespace, "kube-system"):
        assert not can(mn, "update", "leases", ns), f"an MN can update Leases in {ns}"
    assert not can(mn, "list", "secrets", release.watched)
    assert not can(mn, "create", "pods", release.watched)


def test_uninstall_removes_the_operator_and_keeps_the_crd(release: Release) -> None:
    helm("uninstall", release.name, "--namespace", release.namespace, "--wait", "--timeout", "2m",
         kubeconfig=release.cluster.kubeconfig)
    assert release.get("deployment", release.fullname, "-n", release.namespace) is None
    assert release.get("role", release.fullname, "-n", release.watched) is None
    assert release.get("clusterrole", f"{release.fullname}-crds") is None
    assert release.get("clusterrole", release.mn_cluster_role) is None
    wait_for("the operator pod to go", lambda: not release.operator_pods(), timeout=60)
    assert release.get("crd", "zstackclusters.zstack.io") is not None, "helm uninstall must keep the CRD"
    assert release.get("zsc", "demo", "-n", release.watched) is not None, "clusters outlive the operator"
