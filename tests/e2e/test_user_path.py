"""The user's path, end to end, in containers (issue 15): our images on a real kubelet with containerd.

Steps 1-4 and 10 are `make demo`'s and `make demo-down`'s own code (`zstack-dev demo up` / `down`):
1. every image built (`zstack-dev images`), imported into the node, never pulled;
2. `helm install` of the chart with the locally built operator image;
3. a managed-mode ZStackCluster: 3 MNs, RabbitMQ and PostgreSQL (our Debian builds) run by the operator,
   in namespaces that enforce Pod Security "restricted";
4. `kubectl get zsc` shows Ready with Ring 3/3; the API needs the generated token over verified HTTPS, and
   the demo's Prometheus scrapes every MN and the operator; the NetworkPolicies of the operator and of the
   ZStackCluster are enforced (kube-router's firewall on the node): a pod outside the cloud cannot open the
   PostgreSQL or RabbitMQ port while an MN can, and the operator cannot open what its egress leaves out;
5. `zstack-cli`, in a pod, adds hosts and creates VMs through the MN Service's DNS name;
6. `kubectl scale zsc --replicas 5`: 5/5;
7. SIGKILL of one MN container's process on the host: the ring converges, the pod restarts with a new UUID;
8. the PostgreSQL pod deleted: it comes back with its data;
9. back to 3: 3/3;
10. `demo down`: the ZStackCluster deleted, `helm uninstall`, no pod is left, the volumes are recycled and
    only the CRD stays (`zstack-dev down` is proven clean by tests/devcluster/test_container_node.py).

The times it takes are printed (pytest -s), never asserted: they are measured in the note and README.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.containernode import ContainerNode, restricted, wait_for
from zstack_devcluster import demo
from zstack_devcluster import images as builds

pytestmark = [pytest.mark.k8s, pytest.mark.slow, pytest.mark.timeout(1500)]

NS, CLUSTER, OPERATOR_NS = demo.NAMESPACE, demo.CLUSTER, demo.OPERATOR_NS


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

    # 1-4. `make demo`: images imported, the operator from its image with Helm, a managed-mode cloud of 3 MNs
    started = time.monotonic()
    ready = demo.up(node.root, replicas=3, say=print)
    figures["demo_up_s"] = time.monotonic() - started
    assert ready["ring"] == "3/3" and len({mn["uuid"] for mn in ready["mns"]}) == 3
    assert "3/3" in ready["get_zsc"] and "Ready" in ready["get_zsc"], ready["get_zsc"]
    wait_ring(node, 3)
    for ns in (OPERATOR_NS, NS):
        assert node.get("namespace", ns)["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"
    figures["mn_pod_start_to_ready_s"] = max(ready_seconds(node.get("pod", p, NS)) for p in mn_pods(node))
    pods = json.loads(node.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    assert {c["containerID"].split("://")[0] for p in pods for c in p["status"]["containerStatuses"]} == {"containerd"}
    ours = {builds.image_name(image) for image in demo.IMAGES}
    assert {c["image"] for p in pods for c in p["spec"]["containers"] if p["metadata"]["namespace"] != "kube-system"} \
        == ours, "the demo runs our four images, and nothing else"
    assert {c["image"] for c in ready["containers"]} == ours
    (operator,) = ready["operator"]
    operator_pod = node.get("pod", operator["pod"], OPERATOR_NS)
    assert "--all-namespaces" in operator_pod["spec"]["containers"][0]["args"]
    check_api_needs_the_generated_token(node, ready)
    check_prometheus_scrapes_the_mns_and_the_operator(ready)
    again = demo.up(node.root, replicas=3, say=print)
    assert [mn["uuid"] for mn in again["mns"]] == [mn["uuid"] for mn in ready["mns"]], "a second up restarted MNs"
    check_network_policies_are_enforced(node)

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
    wait_for("PostgreSQL to be Ready again", lambda: (pod := node.find("pod", db_pod, NS)) is not None
             and pod["metadata"]["uid"] != old_uid
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

    # 10. `make demo-down`'s first half: the cloud deleted, the operator uninstalled, the volumes recycled
    assert demo.down(node.root, say=print)
    assert not node.kubectl("get", "zsc,pods,pvc", "-n", NS, "-o", "name").stdout.strip()
    assert not node.kubectl("get", "pods", "-n", OPERATOR_NS, "-o", "name").stdout.strip()
    volumes = json.loads(node.kubectl("get", "pv", "-o", "json").stdout)["items"]
    assert volumes and {v["status"]["phase"] for v in volumes} == {"Available"}, "a deleted cloud's volumes are reused"
    assert node.kubectl("get", "crd", "zstackclusters.zstack.io", check=False).returncode == 0, "the CRD stays"
    assert not demo.prometheus_running(node.root)
    assert demo.down(node.root, say=print) is False
    print("\nuser path figures:", json.dumps({k: round(v, 1) for k, v in figures.items()}))


def verifying(ready: dict[str, Any]) -> ssl.SSLContext:
    """Verifies the demo's MNs against the CA file it printed. A pod IP is in no certificate: the chain of a
    CA that signed only this cluster's certificate proves who answers."""
    context = ssl.create_default_context(cafile=ready["ca_file"])
    context.check_hostname = False
    return context


def check_api_needs_the_generated_token(node: ContainerNode, ready: dict[str, Any]) -> None:
    """From this machine, through the routed pod IP the demo printed, as its "try next" lines do."""
    url = ready["mns"][0]["url"] + "/v1/vms"
    assert url.startswith("https://"), "the demo's API must be HTTPS, as every ZStackCluster's by default"
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context())  # the system's CAs
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError), untrusted.value
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5, context=verifying(ready))
    assert refused.value.code == 401
    token = base64.b64decode(node.get("secret", f"{CLUSTER}-api-token", NS)["data"]["token"]).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5, context=verifying(ready)) as response:
        assert json.load(response) == {"vms": []}


def check_prometheus_scrapes_the_mns_and_the_operator(ready: dict[str, Any]) -> None:
    """The printed Prometheus has every MN (labelled with its ZStackCluster) and the operator as healthy targets."""
    def healthy() -> dict[str, int] | None:
        query = urllib.parse.quote("count by (job, zstack_cluster) (up == 1)")
        with urllib.request.urlopen(f"{ready['prometheus']}/api/v1/query?query={query}", timeout=5) as response:
            result = json.load(response)["data"]["result"]
        seen = {f"{r['metric']['job']}/{r['metric'].get('zstack_cluster', '')}": int(r["value"][1]) for r in result}
        return seen if seen == {"zstack-mn/demo": 3, "zstack-operator/": 1} else None

    wait_for("Prometheus to scrape 3 MNs of demo and the operator", healthy, timeout=60)


PROBE = """import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "open")
    except OSError as err:
        print(target, type(err).__name__)
"""


def opens(node: ContainerNode, namespace: str, pod: str, *targets: str) -> dict[str, bool]:
    """Which `host:port` targets a TCP connect from inside `pod` opens (kubectl exec; Python is in every image
    of ours that the probes run in)."""
    out = node.kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", PROBE, *targets).stdout
    return {target: verdict == "open" for target, verdict in (line.split() for line in out.splitlines())}


def check_network_policies_are_enforced(node: ContainerNode) -> None:
    """A listening pod in a namespace of its own, outside the cloud, probes and is probed."""
    node.apply({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "outsider", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
               {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "outsider"},
                "spec": {"containers": [restricted({
                    "name": "probe", "image": builds.image_name("node"),
                    "command": ["python3", "-m", "http.server", "8080"],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}})]}})
    node.kubectl("wait", "-n", "outsider", "--for=condition=Ready", "pod/probe", "--timeout=120s")
    outsider = f"{node.get('pod', 'probe', 'outsider')['status']['podIP']}:8080"
    postgresql, rabbitmq, api = (f"{CLUSTER}-{name}.{NS}.svc:{port}"
                                 for name, port in (("postgresql", 5432), ("rabbitmq", 5672), ("api", 8080)))
    operator_pod = json.loads(node.kubectl("get", "pods", "-n", OPERATOR_NS, "-o", "json").stdout)["items"][0]
    expected = {
        (NS, f"{CLUSTER}-mn-0"): {postgresql: True, rabbitmq: True, api: True, outsider: True},
        ("outsider", "probe"): {postgresql: False, rabbitmq: False, api: True},  # the API is open to every pod
        (OPERATOR_NS, operator_pod["metadata"]["name"]): {api: True, outsider: False},  # the chart's egress policy
    }

    def seen() -> dict[tuple[str, str], dict[str, bool]]:
        return {source: opens(node, *source, *targets) for source, targets in expected.items()}

    deadline = time.monotonic() + 60  # a new pod's rules take kube-router a moment
    while (actual := seen()) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert actual == expected
    node.kubectl("delete", "namespace", "outsider", "--wait=false")
