"""Every panel of the Grafana dashboards shows data for a running 3-MN ZStackCluster and its operator.

A private Prometheus (Debian's) scrapes the MN pods through discovery with the operator's own relabelings and
the operator process as a static target; light load on the cloud API (a host, VMs created, stopped and started
through the REST API) moves the bus, job and API counters. Then each panel's expressions, with the dashboard
variables filled in as Grafana would, are evaluated through Prometheus's HTTP API: a panel with no data fails,
named with its dashboard and expression.
"""

from __future__ import annotations

import base64
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.services import Prometheus, ServiceError
from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import wait_for
from tests.operator.conftest import TIMEOUT, OperatorProcess, Zsc
from tests.test_dashboards_format import DASHBOARDS, load, substitute, targets
from zstack_cli.client import ApiClient

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

DATA_TIMEOUT = 60.0  # after the load: rates need two scrapes, and new targets reach the scrape loop within ~5s
VMS = 3


def _say(msg: str) -> None:
    print(f"[prometheus] {msg}", file=sys.stderr, flush=True)


@pytest.fixture
def prometheus(devcluster: KubeCluster, operator: OperatorProcess, tmp_path: Path) -> Iterator[Prometheus]:
    """A private Prometheus scraping the devcluster's MN pods and the test's operator process every second."""
    server = Prometheus(tmp_path / "prometheus", kubeconfig=devcluster.kubeconfig, say=_say,
                        static_targets={"zstack-operator": [f"127.0.0.1:{operator.port}"]})
    try:
        server.start()
    except ServiceError as err:
        pytest.fail(f"the private Prometheus could not start:\n{err}", pytrace=False)
    yield server
    server.stop()


def api_token(zsc: Zsc) -> str:
    encoded = zsc.read("get", "secret", f"{zsc.name}-api-token", "-o", "jsonpath={.data.token}")
    return base64.b64decode(encoded).decode()


def load_the_cloud(zsc: Zsc) -> None:
    """A host, then VMs created (and started), stopped and started again, each request to another MN."""
    token = api_token(zsc)
    clients = [ApiClient(f"http://{zsc.ip(pod)}:{zsc.port}", token) for pod in zsc.pod_names(3)]
    host = clients[0].wait_job(clients[0].add_host("host-1", cpu=64, memory=65536), timeout=TIMEOUT)
    jobs = [clients[i % 3].create_vm(f"vm-{i}", cpu=1, memory=512, host_uuid=host["resource_uuid"])
            for i in range(VMS)]
    vms = [clients[i % 3].wait_job(job, timeout=TIMEOUT)["resource_uuid"] for i, job in enumerate(jobs)]
    for action in ("stop", "start"):
        jobs = [clients[(i + 1) % 3].vm_action(vm, action) for i, vm in enumerate(vms)]
        for i, job in enumerate(jobs):
            clients[i % 3].wait_job(job, timeout=TIMEOUT)
    clients[2].list_vms()


def empty_panels(prometheus: Prometheus, values: dict[str, str]) -> tuple[list[str], list[str]]:
    """(targets with no data, targets whose every value is NaN), each as "dashboard / panel / expr"."""
    empty, nan_only = [], []
    for name in sorted(DASHBOARDS):
        for panel, target in targets(load(name)):
            expr = substitute(target["expr"], values)
            result = prometheus.query(expr)
            where = f"{name} / {panel['title']!r} / {expr}"
            if not result:
                empty.append(where)
            elif all(math.isnan(float(series["value"][1])) for series in result):
                nan_only.append(where)
    return empty, nan_only


def scrape_health(prometheus: Prometheus) -> str:
    lines = [f"{t['labels'].get('job')} {t['scrapeUrl']} {t['labels'].get('pod', '')} {t['health']} "
             f"{t['lastError']}" for t in prometheus.targets()]
    return "--- Prometheus targets\n" + ("\n".join(lines) or "(none)")


def test_every_panel_of_both_dashboards_shows_data(operator: OperatorProcess, zsc: Zsc,
                                                   prometheus: Prometheus) -> None:
    # Watching before the cluster exists, as in production: the operator's first reconciles show in its rates.
    wait_for("Prometheus to scrape the operator", lambda: prometheus.query('up{job="zstack-operator"} == 1'),
             DATA_TIMEOUT, interval=0.5, info=lambda: scrape_health(prometheus))
    zsc.apply()
    zsc.wait_summary("3/3")
    load_the_cloud(zsc)
    values = {"namespace": zsc.ns, "cluster": zsc.name}

    # The variables list this cluster, read from the labels discovery and the relabelings put on the MN series.
    wait_for(f"the namespace variable to list {zsc.ns}",
             lambda: zsc.ns in prometheus.label_values("namespace", "zstack_node_info"), DATA_TIMEOUT,
             interval=1.0, info=lambda: scrape_health(prometheus))
    clusters = prometheus.label_values("zstack_cluster", f'zstack_node_info{{namespace="{zsc.ns}"}}')
    assert clusters == [zsc.name], f"the cluster variable lists {clusters}, expected [{zsc.name!r}]"

    deadline = time.monotonic() + DATA_TIMEOUT
    while (found := empty_panels(prometheus, values))[0] and time.monotonic() < deadline:
        time.sleep(1.0)
    empty, nan_only = found
    assert not empty, ("panels with no data:\n" + "\n".join(empty) + "\n" + scrape_health(prometheus))
    if nan_only:  # a quantile of a histogram without observations in the window: Grafana draws no line
        warnings.warn("panels whose every value is NaN (no observation in the window):\n" + "\n".join(nan_only),
                      stacklevel=1)
