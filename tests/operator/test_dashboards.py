"""Every panel of the Grafana dashboards shows data for a running 3-MN ZStackCluster and its operator.

A private Prometheus (Debian's) scrapes the MN pods through discovery with the operator's own relabelings and
the operator process as a static target; light load on the cloud API (a host, VMs created, stopped and started,
and host pings, which are bus calls to the host's owner, all through the REST API of every MN) moves the bus,
job and API counters. Then each panel's expressions, with the dashboard variables filled in as Grafana would,
are evaluated through Prometheus's HTTP API: a panel with no data fails, named with its dashboard and
expression, and so does one whose every value is NaN (a quantile with no observation: Grafana draws nothing).
"""

from __future__ import annotations

import base64
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kube import KubeCluster
from tests.fixtures.servers import running
from tests.k8s.conftest import wait_for
from tests.operator.conftest import TIMEOUT, OperatorProcess, Zsc
from tests.test_dashboards_format import DASHBOARDS, load, substitute, targets
from zstack_cli.client import ApiClient
from zstack_devcluster.services import Prometheus

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

DATA_TIMEOUT = 60.0  # after the load: rates need two scrapes, and new targets reach the scrape loop within ~5s
VMS = 3
PINGS = 3  # per MN: bus calls for the bus-call latency panel


def _say(msg: str) -> None:
    print(f"[prometheus] {msg}", file=sys.stderr, flush=True)


@pytest.fixture
def prometheus(devcluster: KubeCluster, operator: OperatorProcess, tmp_path: Path) -> Iterator[Prometheus]:
    """A private Prometheus scraping the devcluster's MN pods and the test's operator process every second."""
    server = Prometheus(tmp_path / "prometheus", kubeconfig=devcluster.kubeconfig, say=_say,
                        static_targets={"zstack-operator": [f"127.0.0.1:{operator.port}"]})
    yield from running(server, "Prometheus")


def api_token(zsc: Zsc) -> str:
    encoded = zsc.read("get", "secret", f"{zsc.name}-api-token", "-o", "jsonpath={.data.token}")
    return base64.b64decode(encoded).decode()


def load_the_cloud(zsc: Zsc, tmp_path: Path) -> None:
    """A host, then VMs created (and started), stopped and started again, each request to another MN; then the
    host pinged through every MN (request/reply bus calls to its owner). HTTPS, verified as zstack-cli does."""
    token = api_token(zsc)
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(zsc.ca())
    clients = [ApiClient(zsc.url(pod, ""), token, ca_file=str(ca_file), server_name=zsc.api_server_name)
               for pod in zsc.pod_names(3)]
    host = clients[0].wait_job(clients[0].add_host("host-1", cpu=64, memory=65536), timeout=TIMEOUT)
    jobs = [clients[i % 3].create_vm(f"vm-{i}", cpu=1, memory=512, host_uuid=host["resource_uuid"])
            for i in range(VMS)]
    vms = [clients[i % 3].wait_job(job, timeout=TIMEOUT)["resource_uuid"] for i, job in enumerate(jobs)]
    for action in ("stop", "start"):
        jobs = [clients[(i + 1) % 3].vm_action(vm, action) for i, vm in enumerate(vms)]
        for i, job in enumerate(jobs):
            clients[i % 3].wait_job(job, timeout=TIMEOUT)
    clients[2].list_vms()
    for client in clients:
        for _ in range(PINGS):
            answer = client.ping_host(host["resource_uuid"])
            assert answer["reachable"], answer


# Panels the load must move above zero: a zero there means the query reads the wrong series (a 0-initialised
# counter would otherwise pass as "data").
MOVED_BY_LOAD = {
    ("zstack-cluster", "Message throughput by service"), ("zstack-cluster", "Bus call latency"),
    ("zstack-cluster", "API requests by operation and code"), ("zstack-cluster", "Job latency"),
    ("zstack-cluster", "Hosts tracked"), ("zstack-operator", "Reconciles by result"),
    ("zstack-operator", "ZStackClusters managed"),
}
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def empty_panels(prometheus: Prometheus, values: dict[str, str]) -> tuple[list[str], list[str]]:
    """(targets with no data, targets whose every value is NaN), each as "dashboard / panel / expr"; a panel the
    load drives counts as empty while all its values are zero."""
    empty, nan_only = [], []
    for name in sorted(DASHBOARDS):
        for panel, target in targets(load(name)):
            expr = substitute(target["expr"], values)
            result = prometheus.query(expr)
            where = f"{name} / {panel['title']!r} / {expr}"
            numbers = [float(series["value"][1]) for series in result]
            if not result or ((name, panel["title"]) in MOVED_BY_LOAD and not any(v > 0 for v in numbers)):
                empty.append(where)
            elif all(math.isnan(v) for v in numbers):
                nan_only.append(where)
    return empty, nan_only


def test_legends_name_labels_the_series_carry(operator: OperatorProcess, zsc: Zsc, prometheus: Prometheus) -> None:
    """Each `{{label}}` of a panel's legend is a label of every series its query returns (else Grafana shows
    the raw template): checked on a running cluster, as for the panels' data."""
    zsc.apply()
    zsc.wait_summary("3/3")
    values = {"namespace": zsc.ns, "cluster": zsc.name}
    wait_for("Prometheus to scrape all 3 MNs",
             lambda: len(prometheus.query(f'zstack_node_info{{namespace="{zsc.ns}"}}')) == 3, DATA_TIMEOUT,
             interval=0.5, info=lambda: scrape_health(prometheus))
    missing = []
    for name in sorted(DASHBOARDS):
        for panel, target in targets(load(name)):
            wanted = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
            for series in prometheus.query(substitute(target["expr"], values)):
                if absent := wanted - set(series["metric"]):
                    missing.append(f"{name} / {panel['title']!r}: {sorted(absent)} not in {series['metric']}")
    assert not missing, "legends naming labels the series lack:\n" + "\n".join(missing)


def scrape_health(prometheus: Prometheus) -> str:
    lines = [f"{t['labels'].get('job')} {t['scrapeUrl']} {t['labels'].get('pod', '')} {t['health']} "
             f"{t['lastError']}" for t in prometheus.targets()]
    return "--- Prometheus targets\n" + ("\n".join(lines) or "(none)")


def test_every_panel_of_both_dashboards_shows_data(operator: OperatorProcess, zsc: Zsc,
                                                   prometheus: Prometheus, tmp_path: Path) -> None:
    # Watching before the cluster exists, as in production: the operator's first reconciles show in its rates.
    wait_for("Prometheus to scrape the operator", lambda: prometheus.query('up{job="zstack-operator"} == 1'),
             DATA_TIMEOUT, interval=0.5, info=lambda: scrape_health(prometheus))
    zsc.apply()
    zsc.wait_summary("3/3")
    values = {"namespace": zsc.ns, "cluster": zsc.name}

    # The variables list this cluster, read from the labels discovery and the relabelings put on the MN series.
    wait_for(f"the namespace variable to list {zsc.ns}",
             lambda: zsc.ns in prometheus.label_values("namespace", "zstack_node_info"), DATA_TIMEOUT,
             interval=1.0, info=lambda: scrape_health(prometheus))
    clusters = prometheus.label_values("zstack_cluster", f'zstack_node_info{{namespace="{zsc.ns}"}}')
    assert clusters == [zsc.name], f"the cluster variable lists {clusters}, expected [{zsc.name!r}]"
    # Every MN scraped before the load, as in production: a first scrape after it would see no increase (no rate).
    wait_for("Prometheus to scrape all 3 MNs",
             lambda: len(prometheus.query(f'zstack_node_info{{namespace="{zsc.ns}"}}')) == 3, DATA_TIMEOUT,
             interval=0.5, info=lambda: scrape_health(prometheus))
    load_the_cloud(zsc, tmp_path)

    deadline = time.monotonic() + DATA_TIMEOUT
    while any(found := empty_panels(prometheus, values)) and time.monotonic() < deadline:
        time.sleep(1.0)
    empty, nan_only = found
    assert not empty, ("panels with no data:\n" + "\n".join(empty) + "\n" + scrape_health(prometheus))
    # A quantile of a histogram without observations in the window is NaN: Grafana draws no line, so no data.
    assert not nan_only, ("panels whose every value is NaN (no observation in the window):\n" + "\n".join(nan_only)
                          + "\n" + scrape_health(prometheus))


def test_panels_said_to_move_with_load_exist() -> None:
    titles = {(name, panel["title"]) for name in DASHBOARDS for panel, _ in targets(load(name))}
    assert titles >= MOVED_BY_LOAD, f"no such panels: {sorted(MOVED_BY_LOAD - titles)}"
