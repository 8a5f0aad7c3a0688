"""The user's path, end to end, in containers (issue 15): our images on a real kubelet with containerd.

1. both images built (`zstack-dev images`), imported into the node, never pulled;
2. `helm install` of the chart with the locally built operator image;
3. a managed-mode ZStackCluster: 3 MNs, RabbitMQ and PostgreSQL (our Debian builds) run by the operator,
   in a namespace that enforces Pod Security "restricted";
4. `kubectl get zsc` shows Ready with Ring 3/3;
5. `zstack-cli`, in a pod, adds hosts and creates VMs through the MN Service's DNS name;
6. `kubectl scale zsc --replicas 5`: 5/5;
7. SIGKILL of one MN container's process on the host: the ring converges, the pod restarts with a new UUID;
8. the PostgreSQL pod deleted: it comes back with its data;
9. back to 3: 3/3;
10. the ZStackCluster deleted and `helm uninstall`: no pod is left (`zstack-dev down` is proven clean by
    tests/devcluster/test_container_node.py).

The times it takes are printed (pytest -s), never asserted: they are measured in the note and README.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.chart import CHART, helm
from tests.fixtures.containernode import ContainerNode, restricted, wait_for
from zstack_devcluster import images as builds

pytestmark = [pytest.mark.k8s, pytest.mark.slow, pytest.mark.timeout(1500)]

NS, CLUSTER, OPERATOR_NS, RELEASE = "cloud", "demo", "zstack-system", "zstack-operator"
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"
RABBITMQ_IMAGE, POSTGRES_IMAGE = builds.image_name("rabbitmq"), builds.image_name("postgresql")  # ours, from Debian


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, images_built: object) -> Iterator[ContainerNode]:
    cluster, _ = ContainerNode.start(tmp_path_factory.mktemp("userpath"))
    try:
        yield cluster
    finally:
        down = cluster.zstack_dev("down")
        assert down.returncode == 0, down.stderr


def zsc_columns(node: ContainerNode) -> dict[str, str]:
    """`kubectl get zsc demo` as the user reads it (NAME REPLICAS READY RING BROKER DATABASE STATUS AGE);
    a column still empty reads `<none>`."""
    out = node.kubectl("get", "zsc", CLUSTER, "-n", NS, "-o", "custom-columns=READY:.status.readyReplicas,"
                       "RING:.status.ring.summary,STATUS:.status.conditions[?(@.type=='Ready')].reason").stdout
    header, row = out.splitlines()
    return dict(zip(header.split(), row.split(), strict=True))


def wait_ring(node: ContainerNode, replicas: int) -> None:
    want = {"READY": str(replicas), "RING": f"{replicas}/{replicas}", "STATUS": "Ready"}
    wait_for(f"`kubectl get zsc` to show Ready and Ring {replicas}/{replicas}",
             lambda: want.items() <= zsc_columns(node).items(), timeout=300)


class Api:
    """`zstack-cli` from the host against one MN pod's IP (routed to the node's pod network)."""

    def __init__(self, node: ContainerNode, ca_file: Path) -> None:
        self.node = node
        token = node.get("secret", f"{CLUSTER}-api-token", NS)["data"]["token"]
        self.env = dict(os.environ, ZSTACK_API_TOKEN=base64.b64decode(token).decode(),
                        ZSTACK_CA_FILE=str(ca_file), ZSTACK_TLS_SERVER_NAME=f"{CLUSTER}-api.{NS}.svc")

    def cli(self, pod: str, *args: str) -> Any:
        ip = self.node.get("pod", pod, NS)["status"]["podIP"]
        proc = subprocess.run(["zstack-cli", "--url", f"https://{ip}:8080", "-o", "json", *args],
                              capture_output=True, text=True, env=self.env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def ring(self, pod: str) -> dict[str, Any] | None:
        try:
            return self.cli(pod, "ring")
        except (AssertionError, json.JSONDecodeError):
            return None  # restarting, or not serving yet


def mn_pods(node: ContainerNode) -> list[str]:
    pods = json.loads(node.kubectl("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=mn",
                                   "-o", "json").stdout)["items"]
    return sorted(p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp") is None)


def rings_agree(api: Api, node: ContainerNode, replicas: int, without: str = "") -> set[str] | None:
    """The one member set every MN's ring holds, when all `replicas` agree (and none holds `without`)."""
    pods = mn_pods(node)
    rings = [api.ring(pod) for pod in pods]
    members = [frozenset(r["members"]) for r in rings if r]
    if len(pods) != replicas or len(members) != replicas or len(set(members)) != 1:
        return None
    (agreed,) = set(members)
    return set(agreed) if len(agreed) == replicas and without not in agreed else None


def ready_seconds(pod: dict[str, Any]) -> float:
    """From the pod's start to its Ready condition, by the kubelet's own timestamps (1 s resolution)."""
    def at(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    return at(ready["lastTransitionTime"]) - at(pod["status"]["startTime"])


CLI_SCRIPT = """set -e
for i in 1 2 3; do zstack-cli hosts add host-$i --cpu 32 --memory 65536 >&2; done
for i in 1 2 3 4 5; do zstack-cli vms create vm-$i --cpu 2 --memory 2048 >&2; done
zstack-cli -o json vms list
"""


def test_the_users_path_in_containers(node: ContainerNode, tmp_path: Path) -> None:
    figures: dict[str, float] = {}
    operator_image = builds.image_name("operator")
    for ns in (OPERATOR_NS, NS):
        node.kubectl("create", "namespace", ns)
        node.kubectl("label", "namespace", ns, RESTRICTED)

    # 2. the operator from its image, installed with Helm
    repository, tag = operator_image.rsplit(":", 1)
    helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NS,
         "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
         "--wait", "--timeout", "3m", kubeconfig=node.root / "kubeconfig")

    # 3-4. a managed-mode cloud of 3 MNs
    started = time.monotonic()
    node.apply({"apiVersion": "zstack.io/v1alpha1", "kind": "ZStackCluster",
                "metadata": {"name": CLUSTER, "namespace": NS},
                "spec": {"replicas": 3, "image": builds.image_name("node"), "imagePullPolicy": "Never",
                         "broker": {"managed": {"image": RABBITMQ_IMAGE}},
                         "database": {"managed": {"image": POSTGRES_IMAGE}}}})
    wait_ring(node, 3)
    figures["apply_to_ring_3_of_3_s"] = time.monotonic() - started
    figures["mn_pod_start_to_ready_s"] = max(ready_seconds(node.get("pod", p, NS)) for p in mn_pods(node))
    pods = json.loads(node.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    assert {c["containerID"].split("://")[0] for p in pods for c in p["status"]["containerStatuses"]} == {"containerd"}

    # 5. zstack-cli in a pod, through the Service's DNS name
    ca_volume = {"name": "ca", "configMap": {"name": f"{CLUSTER}-api-ca"}}
    cli_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cli", "namespace": NS},
               "spec": {"restartPolicy": "Never", "volumes": [ca_volume],
                        "containers": [restricted({
                            "name": "cli", "image": builds.image_name("node"), "command": ["sh", "-c", CLI_SCRIPT],
                            "env": [{"name": "ZSTACK_API_URL", "value": f"https://{CLUSTER}-api.{NS}.svc:8080"},
                                    {"name": "ZSTACK_CA_FILE", "value": "/ca/ca.crt"},
                                    {"name": "ZSTACK_API_TOKEN", "valueFrom": {"secretKeyRef": {
                                        "name": f"{CLUSTER}-api-token", "key": "token"}}}],
                            "volumeMounts": [{"name": "ca", "mountPath": "/ca"}]})]}}
    node.apply(cli_pod)
    phase = wait_for("the zstack-cli pod to finish", lambda: {"Succeeded", "Failed"} & {
        node.get("pod", "cli", NS)["status"].get("phase")}, timeout=300)
    out = node.kubectl("logs", "-n", NS, "cli").stdout
    assert phase == {"Succeeded"}, out
    vms = json.loads(out[out.index('{\n  "vms"'):])
    assert sorted(vm["name"] for vm in vms["vms"]) == [f"vm-{i}" for i in range(1, 6)], vms
    assert all(vm["state"] == "Running" for vm in vms["vms"]), vms
    node.kubectl("delete", "pod", "-n", NS, "cli")

    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(node.get("configmap", f"{CLUSTER}-api-ca", NS)["data"]["ca.crt"])
    api = Api(node, ca_file)

    # 6. scale out
    node.kubectl("scale", "zsc", CLUSTER, "-n", NS, "--replicas=5")
    wait_ring(node, 5)
    members = wait_for("every MN's ring to hold the same 5", lambda: rings_agree(api, node, 5))

    # 7. kill -9 one MN container's process, on the host
    victim = f"{CLUSTER}-mn-1"
    old_uuid = api.cli(victim, "ring")["self"]
    status = node.get("pod", victim, NS)["status"]["containerStatuses"][0]
    killed = time.monotonic()
    os.kill(node.task_pid(status["containerID"]), signal.SIGKILL)
    after = wait_for("the rings to converge without the killed MN", lambda: rings_agree(api, node, 5, old_uuid),
                     timeout=180)
    figures["kill9_to_ring_converged_s"] = time.monotonic() - killed
    new_uuid = api.cli(victim, "ring")["self"]
    assert new_uuid != old_uuid and new_uuid in after and old_uuid in members
    assert node.get("pod", victim, NS)["status"]["containerStatuses"][0]["restartCount"] >= 1

    # 8. the database pod deleted: back with its data
    db_pod = f"{CLUSTER}-postgresql-0"
    old_uid = node.get("pod", db_pod, NS)["metadata"]["uid"]
    deleted = time.monotonic()
    node.kubectl("delete", "pod", "-n", NS, db_pod, "--wait=false")
    wait_for("PostgreSQL to be Ready again", lambda: (pod := node.get("pod", db_pod, NS))["metadata"]["uid"] != old_uid
             and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])),
             timeout=180)
    figures["postgresql_delete_to_ready_s"] = time.monotonic() - deleted
    hosts = wait_for("the hosts to be listed again", lambda: (api.cli(f"{CLUSTER}-mn-0", "hosts", "list") or None),
                     timeout=120)
    assert sorted(h["name"] for h in hosts["hosts"]) == ["host-1", "host-2", "host-3"]

    # 9. scale back in
    node.kubectl("scale", "zsc", CLUSTER, "-n", NS, "--replicas=3")
    wait_ring(node, 3)
    wait_for("every MN's ring to hold the same 3", lambda: rings_agree(api, node, 3))

    # 10. delete the cloud, uninstall the operator: nothing of ours runs any more
    node.kubectl("delete", "zsc", CLUSTER, "-n", NS, "--timeout=180s")
    helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait", "--timeout", "2m",
         kubeconfig=node.root / "kubeconfig")
    wait_for("every pod to be gone", lambda: not json.loads(node.kubectl(
        "get", "pods", "-n", NS, "-o", "json").stdout)["items"] and not json.loads(node.kubectl(
        "get", "pods", "-n", OPERATOR_NS, "-o", "json").stdout)["items"], timeout=180)
    print("\nuser path figures:", json.dumps({k: round(v, 1) for k, v in figures.items()}))
