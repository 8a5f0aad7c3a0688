"""`zstack-dev demo` (what `make demo` runs after `zstack-dev up`): the chart installed watching every namespace,
a 3-MN ZStackCluster Ready on private servers, and `demo down` leaving nothing but the CRD."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import wait_for
from zstack_devcluster import demo

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat_file:
        return stat_file.read().split(")")[1].split()[0] != "Z"


def _get(cluster: KubeCluster, *args: str) -> dict | None:
    out = cluster.kubectl("get", *args, "-o", "json", "--ignore-not-found").stdout
    return json.loads(out) if out.strip() else None


def test_demo_up_runs_the_operator_and_a_ring_of_three_and_down_leaves_only_the_crd(devcluster: KubeCluster) -> None:
    root = devcluster.root
    if demo.servers_running(root):
        pytest.skip(f"a demo of yours runs in {root} ($ZSTACK_DEV_DIR): this test would take it down")
    ready = demo.up(root, replicas=3, say=lambda _msg: None)
    supervisor = json.loads((root / "demo" / "supervisor.json").read_text())
    try:
        assert ready["ring"] == "3/3"
        assert "3/3" in ready["get_zsc"] and "Ready" in ready["get_zsc"], ready["get_zsc"]
        assert len({mn["uuid"] for mn in ready["mns"]}) == 3
        for mn in ready["mns"]:
            with urllib.request.urlopen(mn["url"] + "/v1/cluster/ring", timeout=5,
                                        context=_verifying(ready)) as response:
                assert sorted(json.load(response)["members"]) == sorted(m["uuid"] for m in ready["mns"])
        (operator,) = ready["operator"]
        pod = _get(devcluster, "pod", operator["pod"], "-n", demo.OPERATOR_NS)
        assert pod["spec"]["containers"][0]["command"] == ["zstack-operator"]
        assert "--all-namespaces" in pod["spec"]["containers"][0]["args"]
        assert "***" in ready["broker"] and "***" in ready["database"], "passwords must be masked"
        servers = root / "demo" / "servers.json"
        assert stat.S_IMODE(servers.stat().st_mode) == 0o600, "the servers' URLs hold passwords"
        _check_api_needs_the_generated_token(devcluster, ready)
        _check_prometheus_scrapes_the_mns_and_the_operator(ready)
        again = demo.up(root, replicas=3, say=lambda _msg: None)
        assert [mn["uuid"] for mn in again["mns"]] == [mn["uuid"] for mn in ready["mns"]], "a second up restarted MNs"
    finally:
        stopped = demo.down(root, say=lambda _msg: None)
    assert stopped
    assert _get(devcluster, "zsc", "demo", "-n", demo.NAMESPACE) is None
    mn_pods = devcluster.kubectl("get", "pods", "-n", demo.NAMESPACE, "-l", demo.MN_SELECTOR, "-o", "name").stdout
    assert not mn_pods.strip(), f"MN pods left behind: {mn_pods}"
    assert _get(devcluster, "deployment", "zstack-operator", "-n", demo.OPERATOR_NS) is None
    assert _get(devcluster, "crd", "zstackclusters.zstack.io") is not None, "demo down keeps the CRD, as helm does"
    assert not _alive(supervisor["pid"]), "RabbitMQ and PostgreSQL must stop"
    logs = list((root / "kubelet" / "pods").glob("default_demo-mn-0_*/logs/*.log"))
    assert logs and any("left the ring gracefully" in log.read_text() for log in logs)
    assert demo.down(root, say=lambda _msg: None) is False


def _verifying(ready: dict) -> ssl.SSLContext:
    """Verifies the demo's MNs against the CA file it printed. A pod IP is in no certificate: the chain of a
    CA that signed only this cluster's certificate proves who answers."""
    context = ssl.create_default_context(cafile=ready["ca_file"])
    context.check_hostname = False
    return context


def _check_api_needs_the_generated_token(cluster: KubeCluster, ready: dict) -> None:
    url = ready["mns"][0]["url"] + "/v1/vms"
    assert url.startswith("https://"), "the demo's API must be HTTPS, as every ZStackCluster's by default"
    context = _verifying(ready)
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context())  # the system's CAs
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError), untrusted.value
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5, context=context)
    assert refused.value.code == 401
    token = cluster.kubectl("get", "secret", "demo-api-token", "-o", "jsonpath={.data.token}").stdout
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {base64.b64decode(token).decode()}"})
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        assert json.load(response) == {"vms": []}


def _check_prometheus_scrapes_the_mns_and_the_operator(ready: dict) -> None:
    """The printed Prometheus has every MN (labelled with its ZStackCluster) and the operator as healthy targets."""
    def healthy() -> dict[str, int] | None:
        query = urllib.parse.quote('count by (job, zstack_cluster) (up == 1)')
        with urllib.request.urlopen(f"{ready['prometheus']}/api/v1/query?query={query}", timeout=5) as response:
            result = json.load(response)["data"]["result"]
        seen = {f"{r['metric']['job']}/{r['metric'].get('zstack_cluster', '')}": int(r["value"][1]) for r in result}
        return seen if seen == {"zstack-mn/demo": 3, "zstack-operator/": 1} else None

    wait_for("Prometheus to scrape 3 MNs of demo and the operator", healthy, timeout=60, interval=1)
