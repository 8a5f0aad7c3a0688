"""The Grafana dashboards in dashboards/: the model Grafana imports, PromQL that parses, metrics that exist.

No servers: promtool parses every expression (as a recording rule, the template variables substituted), and
every metric name must be one the MN or the operator exports. tests/operator/test_dashboards.py evaluates the
same expressions against a real Prometheus scraping a running cluster.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = {path.stem: path for path in sorted((REPO / "dashboards").glob("*.json"))}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MN_FILTERS = ('namespace="$namespace"', 'zstack_cluster="$cluster"')
# Grafana's built-in variables as it expands them on a 1h dashboard with the data source's default 15s scrape
# interval ($__rate_interval is at least 4 scrape intervals).
BUILTINS = {"__rate_interval": "1m", "__interval": "5s", "__range": "1h"}
# A metric name and its label matchers; the matchers are consumed, so label names in them are not taken for metrics.
SELECTOR = re.compile(r"\b(zstack_\w+)\s*(\{[^}]*\})?")


def load(name: str) -> dict[str, Any]:
    return json.loads(DASHBOARDS[name].read_text())


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, also those nested in collapsed rows."""
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels") or []


def targets(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel that is not a row."""
    for panel in panels(doc):
        for target in panel.get("targets") or []:
            yield panel, target


def variables(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in doc["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def substitute(expr: str, values: dict[str, str]) -> str:
    """`expr` with `$name` / `${name}` replaced from `values` and BUILTINS; an unknown variable is an error."""
    known = {**BUILTINS, **values}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in known, f"unknown variable ${name} in {expr!r}: give it a value"
        return known[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def exported_metrics() -> set[str]:
    """Every series name the MN (runtime and cloud) and the operator export, from prometheus_client's registry."""
    import zstack_node.cloud.metrics  # noqa: F401 - registers the metrics
    import zstack_node.metrics  # noqa: F401
    import zstack_operator.metrics  # noqa: F401

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}
    return {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ("",))}


def promtool_check(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on one recording rule per expression: Prometheus's own parser."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: apt-get install prometheus (it ships promtool)"
    rules = {"groups": [{"name": "dashboards", "rules": [{"record": record, "expr": expr}
                                                         for record, expr in exprs.items()]}]}
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_both_dashboards_are_shipped() -> None:
    assert sorted(DASHBOARDS) == ["zstack-cluster", "zstack-operator"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_the_model_has_what_grafana_needs(name: str) -> None:
    doc = load(name)
    assert doc["uid"] == name and doc["title"] and doc["schemaVersion"] == 39
    assert "zstack" in doc["tags"]
    assert (doc["time"], doc["refresh"]) == ({"from": "now-1h", "to": "now"}, "30s")
    datasource = variables(doc)["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), f"{name}: panel ids repeat: {sorted(ids)}"
    for panel in panels(doc):
        if panel["type"] == "row":
            continue
        where = f"{name}: panel {panel.get('id')} {panel.get('title')!r}"
        assert panel.get("title"), f"{name}: panel {panel.get('id')} has no title"
        assert panel.get("datasource") == DATASOURCE, f"{where}: datasource {panel.get('datasource')}"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert [t for t in panel.get("targets") or [] if t.get("expr")], f"{where}: no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{where}: target {target['refId']}: {target}"
            assert target.get("legendFormat"), f"{where}: target {target['refId']} has no legend"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: refIds repeat: {ref_ids}"


def test_the_cluster_dashboard_serves_one_zstackcluster_at_a_time() -> None:
    doc = load("zstack-cluster")
    found = variables(doc)
    assert variable_query(found["namespace"]) == "label_values(zstack_node_info, namespace)"
    assert variable_query(found["cluster"]) == 'label_values(zstack_node_info{namespace="$namespace"}, zstack_cluster)'
    for name in ("namespace", "cluster"):
        assert found[name]["datasource"] == DATASOURCE, f"variable {name}: {found[name]['datasource']}"
    for panel, target in targets(doc):
        selectors = SELECTOR.findall(target["expr"])
        assert selectors, f"panel {panel['title']!r}: {target['expr']!r} reads no zstack metric"
        for metric, labels in selectors:
            missing = [f for f in MN_FILTERS if f not in labels]
            assert not missing, f"panel {panel['title']!r}: {metric}{labels} lacks {missing}: it would mix clusters"


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    values = {"namespace": "zsc-test", "cluster": "demo", "datasource": "prometheus"}
    exprs = {}
    for name in sorted(DASHBOARDS):
        doc = load(name)
        for panel, target in targets(doc):
            record = f"{name.replace('-', '_')}:panel_{panel['id']}_{target['refId']}"
            exprs[record] = substitute(target["expr"], values)
    assert exprs
    result = promtool_check(exprs, tmp_path)
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}\n" + "\n".join(
        f"{record}: {expr}" for record, expr in exprs.items())


def test_quantile_panels_hide_series_without_observations() -> None:
    """A quantile of a histogram with no observation in the window is NaN: `>= 0` drops such series (NaN compares
    false), so a legend never lists, say, a job operation that did not run."""
    for name in sorted(DASHBOARDS):
        for panel, target in targets(load(name)):
            if "histogram_quantile(" in target["expr"]:
                assert target["expr"].rstrip().endswith(">= 0"), f"{name}: {panel['title']!r}: {target['expr']}"


def test_promtool_refuses_a_broken_expression(tmp_path: Path) -> None:
    """The parser check above is real: promtool rejects what Prometheus would reject."""
    result = promtool_check({"broken": "sum by (service) (rate(zstack_bus_messages_sent_total[30s])"}, tmp_path)
    assert result.returncode != 0, f"promtool accepted an unclosed parenthesis:\n{result.stdout}"


def test_every_metric_read_is_one_the_mn_or_the_operator_exports() -> None:
    known = exported_metrics()
    for name in sorted(DASHBOARDS):
        doc = load(name)
        reads = [(f"panel {p['title']!r}", {m for m, _labels in SELECTOR.findall(t["expr"])}) for p, t in targets(doc)]
        reads += [(f"variable {v['name']}", set(re.findall(r"label_values\(\s*(\w+)", variable_query(v))))
                  for v in doc["templating"]["list"] if v["type"] == "query"]
        assert all(metrics for _where, metrics in reads)
        for where, metrics in reads:
            unknown = metrics - known
            assert not unknown, f"{name}: {where} reads {sorted(unknown)}, which nothing exports"
