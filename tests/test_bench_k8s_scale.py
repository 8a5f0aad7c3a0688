"""Smoke run of `zstack-bench k8s-scale --small` on the session's devcluster, RabbitMQ and PostgreSQL: the JSON
shape, sane values and the cleanup, never timings."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from tests.fixtures.kube import KubeCluster
from zstack_bench.cli import main
from zstack_bench.k8s_scale import REPO

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def bench_namespaces(devcluster: KubeCluster) -> dict[str, str]:
    """The bench's namespaces left on the cluster, by name: their phase."""
    items = json.loads(devcluster.kubectl("get", "namespaces", "-o", "json").stdout)["items"]
    return {ns["metadata"]["name"]: ns["status"]["phase"] for ns in items
            if ns["metadata"]["name"].startswith("zstack-bench-")}


def assert_worst_and_mean(value: dict[str, float], key: str) -> None:
    assert set(value) == {"worst", "mean"}, key
    assert value["worst"] >= value["mean"], key


def test_k8s_scale_small(devcluster: KubeCluster, fresh_vhost: str, fresh_database: str,
                         pods_reach: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Started from the repo root with it on PYTHONPATH, as a developer might: the repo's operator/ folder holds
    # zstack_operator only, so the operator subprocess still gets the standard library's `operator` module.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    before = bench_namespaces(devcluster)
    result = CliRunner().invoke(main, ["k8s-scale", "--small", "--dev-dir", str(devcluster.root),
                                       "--broker-url", pods_reach(fresh_vhost),
                                       "--database-url", pods_reach(fresh_database)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    assert "demo is Ready with ring 3/3" in result.stderr, "progress goes to stderr"

    assert data["benchmark"] == "k8s-scale"
    assert data["params"]["rounds"] == 1 and data["params"]["changes"] == 10
    assert set(data["checks"]) == {"ring_after_ready_within_2s", "scale_down_ring_within_3s_incl_1s_prestop",
                                   "spec_to_statefulset_p99_within_1s"}
    assert all(isinstance(ok, bool) for ok in data["checks"].values())
    assert data["targets_met"] == all(data["checks"].values())

    up, down = data["scale_up"], data["scale_down"]
    assert up["members"] == 5, "every MN's ring should have held 5 members after scaling 3 -> 5"
    assert down["members"] == 3, "the 3 remaining MNs' rings should have held 3 members after scaling 5 -> 3"
    for key in ("scale_to_ready_s", "scale_to_ring_s", "ring_after_ready_s"):
        assert_worst_and_mean(up[key], key)
    assert_worst_and_mean(down["scale_down_ring_s"], "scale_down_ring_s")
    [one] = data["rounds"]
    assert one["members_up"] == 5 and one["members_down"] == 3
    assert one["scale_to_ready_s"] > 0 and one["scale_to_ring_s"] > 0 and one["scale_down_ring_s"] > 0
    assert one["ring_after_ready_s"] == pytest.approx(one["scale_to_ring_s"] - one["scale_to_ready_s"], abs=0.002)
    assert up["ring_after_ready_s"]["worst"] == one["ring_after_ready_s"]

    spec = data["spec_to_statefulset"]
    for side in ("operator", "baseline"):
        stats = spec[side]
        assert stats["count"] == 10, side
        assert stats["p50_s"] <= stats["p99_s"] <= stats["max_s"], side
    assert spec["operator"]["p50_s"] > 0, "the operator acts on a change only after it was written"
    assert spec["operator_overhead_p50_s"] == pytest.approx(
        spec["operator"]["p50_s"] - spec["baseline"]["p50_s"], abs=1e-3)
    assert spec["operator_overhead_p99_s"] == pytest.approx(
        spec["operator"]["p99_s"] - spec["baseline"]["p99_s"], abs=1e-3)

    left = {name: phase for name, phase in bench_namespaces(devcluster).items() if name not in before}
    assert all(phase == "Terminating" for phase in left.values()), f"the bench left namespaces behind: {left}"
    for name in left:
        pods = devcluster.kubectl("-n", name, "get", "pods", "-o", "name").stdout
        assert not pods.strip(), f"MN pods left in {name}: {pods}"
