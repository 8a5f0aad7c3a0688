"""A private Prometheus server (Debian's ``prometheus``) that scrapes the MNs and the operator.

``Prometheus(dir, kubeconfig=..., static_targets={"zstack-operator": ["127.0.0.1:8081"]}).start()`` writes
``dir/prometheus.yml``, keeps its TSDB in ``dir/data`` and listens on a free port of 127.0.0.1; ``query(expr)``
evaluates PromQL through the HTTP API, and ``url`` is where users run the dashboards' queries.

Two jobs, their targets labelled as a prometheus-operator PodMonitor labels them (``namespace``, ``pod``,
``container``):

- ``zstack-mn``: the MN pods (``app.kubernetes.io/name=zstack,app.kubernetes.io/component=mn``), container port
  ``http``, relabelled with the operator's own ``zstack_operator.mn.METRICS_RELABELINGS`` (the ``zstack_cluster``
  label), so the PodMonitor and this server share one source;
- ``zstack-operator``: the operator pods of the Helm chart (``app.kubernetes.io/name=zstack-operator``, port
  ``metrics``), plus ``static_targets["zstack-operator"]`` (an operator run as a plain process).

Debian builds Prometheus without Kubernetes service discovery (``kubernetes_sd_configs`` is refused), so a helper
process (:func:`discover`) lists those pods through the Kubernetes API every second and writes them to
``dir/sd/<job>.json`` for ``file_sd_configs``, with the ``__meta_kubernetes_*`` labels Kubernetes discovery
(role ``pod``) would give: the relabelings are the ones a Prometheus with Kubernetes discovery runs.
Without a kubeconfig there is no discovery: only static targets are scraped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from zstack_devcluster.services.base import Say, Service, ServiceError

MN_JOB = "zstack-mn"
OPERATOR_JOB = "zstack-operator"
# job -> (pod label selector, container port name): what a PodMonitor of each would select.
POD_JOBS: dict[str, tuple[str, str]] = {
    MN_JOB: ("app.kubernetes.io/name=zstack,app.kubernetes.io/component=mn", "http"),
    OPERATOR_JOB: ("app.kubernetes.io/name=zstack-operator", "metrics"),
}
_META = "__meta_kubernetes_"
# Not a label Kubernetes discovery gives: ours, from the readiness probe, so that one job scrapes MNs with
# TLS and without (a PodMonitor sets its scheme itself). A private dev server: certificates go unverified.
SCHEME_LABEL = "__meta_zstack_scheme"
log = logging.getLogger(__name__)


class QueryError(RuntimeError):
    """Prometheus refused a query or could not be asked; the message names the expression and the reason."""


def find_binary(explicit: str | None = None) -> str:
    """The ``prometheus`` server binary: ``explicit``, else the one on PATH (Debian: /usr/bin/prometheus)."""
    found = explicit or shutil.which("prometheus")
    if not found or not Path(found).is_file():
        raise ServiceError("Prometheus is not installed: no `prometheus` on PATH. Install the Debian package "
                           "(apt-get install prometheus); its system service need not run.")
    return found


def prometheus_relabelings(relabelings: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """prometheus-operator relabelings (``sourceLabels``, ``targetLabel``) as Prometheus relabel_configs."""
    def snake(key: str) -> str:
        return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), key)

    return [{snake(key): value for key, value in rule.items()} for rule in relabelings]


def _label_name(name: str) -> str:
    """A Kubernetes label key as Prometheus names it in meta labels: `zstack.io/cluster` -> `zstack_io_cluster`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """file_sd target groups for every container port of `pods` (Pod objects as JSON), with the meta labels of
    Prometheus's Kubernetes discovery, role ``pod``. Pods without an IP yet have no target."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        labels = {
            f"{_META}namespace": meta["namespace"], f"{_META}pod_name": meta["name"], f"{_META}pod_ip": ip,
            f"{_META}pod_uid": meta.get("uid", ""), f"{_META}pod_phase": status.get("phase", ""),
            f"{_META}pod_ready": str(ready).lower(), f"{_META}pod_node_name": pod["spec"].get("nodeName", ""),
            **{f"{_META}pod_label_{_label_name(k)}": v for k, v in (meta.get("labels") or {}).items()},
            **{f"{_META}pod_labelpresent_{_label_name(k)}": "true" for k in meta.get("labels") or {}},
        }
        for container in pod["spec"].get("containers") or []:
            for port in container.get("ports") or []:
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                    **labels, f"{_META}pod_container_name": container["name"],
                    f"{_META}pod_container_port_name": port.get("name", ""),
                    f"{_META}pod_container_port_number": str(port["containerPort"]),
                    f"{_META}pod_container_port_protocol": port.get("protocol", "TCP"),
                    SCHEME_LABEL: _probe_scheme(container)}})
    return groups


def _probe_scheme(container: dict[str, Any]) -> str:
    """"https" when the container's readiness probe speaks HTTPS (an MN with TLS), else "http"."""
    probe = (container.get("readinessProbe") or {}).get("httpGet") or {}
    return "https" if str(probe.get("scheme", "HTTP")).upper() == "HTTPS" else "http"


def _pod_target_labels(port_name: str) -> list[dict[str, Any]]:
    """Keep one container port, then label the target as prometheus-operator does: namespace, pod, container."""
    return [
        {"source_labels": [f"{_META}pod_container_port_name"], "regex": port_name, "action": "keep"},
        {"source_labels": [f"{_META}pod_phase"], "regex": "Failed|Succeeded", "action": "drop"},
        {"source_labels": [f"{_META}pod_ip", f"{_META}pod_container_port_number"], "regex": "(.+);(.+)",
         "replacement": "$1:$2", "target_label": "__address__"},
        {"source_labels": [f"{_META}namespace"], "target_label": "namespace"},
        {"source_labels": [f"{_META}pod_name"], "target_label": "pod"},
        {"source_labels": [f"{_META}pod_container_name"], "target_label": "container"},
    ]


class Prometheus(Service):
    """A private Prometheus: ``Prometheus(tmp, kubeconfig=kc).start().query("up")``."""

    kind: ClassVar[str] = "Prometheus"
    default_startup_timeout: ClassVar[float] = 60.0

    def __init__(self, base_dir: Path, *, kubeconfig: Path | None = None, scrape_interval: str = "1s",
                 static_targets: Mapping[str, Sequence[str]] | None = None, discovery_interval: float = 1.0,
                 startup_timeout: float | None = None, say: Say | None = None, binary: str | None = None) -> None:
        super().__init__(base_dir, startup_timeout=startup_timeout, say=say)
        self.kubeconfig = Path(kubeconfig).resolve() if kubeconfig else None
        self.scrape_interval = scrape_interval
        self.static_targets = {job: list(targets) for job, targets in (static_targets or {}).items()}
        self.discovery_interval = discovery_interval
        self._binary = binary

    # -- public ------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port("web_port")

    @property
    def url(self) -> str:
        """Base URL of the web UI and the HTTP API."""
        return f"http://{self.host}:{self.port}"

    @property
    def display_url(self) -> str:
        return self.url  # no credentials to mask

    @property
    def config_file(self) -> Path:
        return self.base_dir / "prometheus.yml"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "log" / "prometheus.log"

    @property
    def discovery_log(self) -> Path:
        return self.base_dir / "log" / "discovery.log"

    def sd_file(self, job: str) -> Path:
        """The file_sd targets of `job`, written by the discovery helper."""
        return self.base_dir / "sd" / f"{job}.json"

    def config(self) -> dict[str, Any]:
        """The configuration written to ``prometheus.yml`` (see the module docstring)."""
        from zstack_operator.mn import METRICS_RELABELINGS  # one source of truth with the operator's PodMonitor

        jobs: list[dict[str, Any]] = []
        for job, (_selector, port_name) in POD_JOBS.items():
            config: dict[str, Any] = {"job_name": job}
            relabel: list[dict[str, Any]] = []
            if self.kubeconfig is not None:
                config["file_sd_configs"] = [{"files": [str(self.sd_file(job))], "refresh_interval": "5s"}]
                relabel = _pod_target_labels(port_name)
                if self.static_targets.get(job):  # static targets carry no pod meta labels: let them pass
                    relabel[0] = {"source_labels": [f"{_META}pod_name", f"{_META}pod_container_port_name"],
                                  "regex": f";|[^;]+;{port_name}", "action": "keep"}
            if job == MN_JOB:
                relabel += prometheus_relabelings(METRICS_RELABELINGS)
                if self.kubeconfig is not None:
                    relabel.append({"source_labels": [SCHEME_LABEL], "regex": "(https?)", "target_label": "__scheme__"})
                    config["tls_config"] = {"insecure_skip_verify": True}
            if self.static_targets.get(job):
                config["static_configs"] = [{"targets": self.static_targets[job]}]
            if len(config) > 1:
                jobs.append({**config, "relabel_configs": relabel} if relabel else config)
        jobs += [{"job_name": job, "static_configs": [{"targets": targets}]}
                 for job, targets in self.static_targets.items() if job not in POD_JOBS and targets]
        interval = self.scrape_interval
        return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
                "scrape_configs": jobs}

    def query(self, expr: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Evaluate ``expr`` now (``/api/v1/query``): the ``result`` list, empty when there is no data."""
        return self._api(f"/api/v1/query?{urllib.parse.urlencode({'query': expr})}", expr, timeout)["result"]

    def label_values(self, label: str, match: str, timeout: float = 10.0) -> list[str]:
        """The values of ``label`` on the series ``match`` selects: what Grafana's ``label_values`` lists."""
        path = f"/api/v1/label/{urllib.parse.quote(label)}/values?{urllib.parse.urlencode({'match[]': match})}"
        return self._api(path, f"label_values({match}, {label})", timeout)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``/api/v1/targets``): labels, health and last error of each."""
        return self._api("/api/v1/targets?state=active", "the active targets", 10.0)["activeTargets"]

    def _api(self, path: str, what: str, timeout: float) -> Any:
        """The ``data`` of a successful HTTP API answer; QueryError naming `what` otherwise."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                doc = json.load(response)
        except urllib.error.HTTPError as err:  # 400/422: a bad expression; the body says why
            try:
                doc = json.load(err)
            except ValueError:
                raise QueryError(f"{what}: HTTP {err.code} from {self.url}") from None
        except (OSError, ValueError) as err:
            raise QueryError(f"{what}: cannot ask Prometheus at {self.url}: {err}. Is it running? "
                             f"See {self.log_file}") from None
        if doc.get("status") != "success":
            raise QueryError(f"{what}: {doc.get('errorType', 'error')}: {doc.get('error', doc)}")
        return doc["data"]

    # -- Service hooks -----------------------------------------------------------------------------------

    def _port_names(self) -> tuple[str, ...]:
        return ("web_port",)

    def _prepare(self) -> None:
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ServiceError(f"Prometheus: kubeconfig {self.kubeconfig} does not exist; pass the devcluster's "
                               "admin kubeconfig (`zstack-dev env` prints it)")
        for sub in ("data", "sd", "log"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        for job in POD_JOBS:
            _write_if_changed(self.sd_file(job), "[]")  # no targets until the helper's first pass
        self.config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    def _launch(self) -> None:
        if self.kubeconfig is not None:
            self._spawn("discovery", [
                sys.executable, "-c", "from zstack_devcluster.services.prometheus import discover; discover()",
                "--kubeconfig", str(self.kubeconfig), "--dir", str(self.base_dir / "sd"),
                "--interval", str(self.discovery_interval), "--parent-pid", str(os.getpid()),
            ], self.discovery_log)
        self._spawn("prometheus", [
            find_binary(self._binary),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.base_dir / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={self.host}:{self.port}",
        ], self.log_file)

    def _probe(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2.0) as response:
            return response.status == 200

    def _log_files(self) -> list[Path]:
        return [self.log_file, *([self.discovery_log] if self.kubeconfig is not None else [])]

    def _hint(self) -> str:
        return (f"Check the logs below. Common causes: a bad {self.config_file} (check it with `promtool check config "
                f"{self.config_file}`), port {self._state.get('web_port')} taken meanwhile, another Prometheus "
                f"using {self.base_dir / 'data'}, or an unreachable API server in {self.kubeconfig}.")


def _write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` atomically (Prometheus never reads half a file) when its content differs."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")  # unique: no two writers mix
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discover(argv: Sequence[str] | None = None) -> None:
    """The discovery helper: every ``--interval`` seconds, list each job's pods and write ``<dir>/<job>.json``.

    A failed listing keeps the last file (Prometheus keeps scraping what it knew) and is logged once per outage.
    """
    parser = argparse.ArgumentParser(prog="prometheus-discovery", description=discover.__doc__)
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit once this process is gone")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM exits through atexit, which removes the client's temporary certificate and key files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from zstack_kube.client import Client  # slow to import (kubernetes): only in the helper
    from zstack_kube.login import login

    api = Client(login(args.kubeconfig), timeout=10)
    log.info("listing the pods of %s every %gs into %s", ", ".join(f"{job} ({sel})" for job, (sel, _) in
                                                                 POD_JOBS.items()), args.interval, args.dir)
    failing: set[str] = set()
    while args.parent_pid is None or _alive(args.parent_pid):  # an orphan (its owner was killed) stops
        for job, (selector, _port) in POD_JOBS.items():
            try:
                groups = pod_targets(api.get("/api/v1/pods", labelSelector=selector)["items"])
            except Exception as exc:  # noqa: BLE001 - an API server outage: keep the last targets, try again
                if job not in failing:
                    log.error("%s: cannot list pods %s: %s; keeping the last targets", job, selector, exc)
                failing.add(job)
                continue
            if job in failing:
                log.info("%s: listing pods works again", job)
                failing.discard(job)
            if _write_if_changed(args.dir / f"{job}.json", json.dumps(groups, indent=1, sort_keys=True)):
                log.info("%s: %d target(s): %s", job, len(groups), " ".join(g["targets"][0] for g in groups))
        time.sleep(args.interval)
