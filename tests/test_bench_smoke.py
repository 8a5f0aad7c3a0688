"""Smoke runs of `zstack-bench` at its small sizes: the JSON shape and sane values, never timings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from zstack_bench.cli import main


def bench(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    assert isinstance(data["targets_met"], bool)
    assert data["checks"] and all(isinstance(ok, bool) for ok in data["checks"].values())
    assert data["targets_met"] == all(data["checks"].values())
    return data


def worst_and_mean(data: dict[str, Any], key: str) -> tuple[float, float]:
    value = data[key]
    assert set(value) == {"worst", "mean"}, key
    return value["worst"], value["mean"]


def test_ring_small() -> None:
    data = bench("ring", "--small")
    assert data["benchmark"] == "ring"
    assert data["params"]["mns"] == 10 and data["params"]["keys"] == 20_000
    assert data["moved_between_staying"] == 0
    assert data["checks"]["no_moves_between_staying"] is True
    for key in ("balance_ratio", "join_moves_ratio", "leave_moves_ratio"):
        worst, mean = worst_and_mean(data, key)
        assert 0.5 < mean <= worst < 2.0, key
    for key in ("ring_max_over_mean", "jump_max_over_mean"):
        worst, mean = worst_and_mean(data, key)
        assert 1.0 <= mean <= worst < 2.0, key
    join_share, _ = worst_and_mean(data, "join_moved_share")
    assert 0 < join_share < 0.5
    for key in ("lookup_us", "jump_lookup_us", "build_ms"):
        assert worst_and_mean(data, key)[1] > 0, key


@pytest.mark.slow
def test_bus_small(fresh_vhost: str) -> None:
    data = bench("bus", "--small", "--broker-url", fresh_vhost)
    assert data["benchmark"] == "bus"
    for side in ("raw_call", "bus_call"):
        stats = data[side]
        assert stats["count"] == data["params"]["calls"] > 0
        assert 0 < stats["p50_ms"] <= stats["p99_ms"]
        assert stats["mean_ms"] > 0
    assert data["call_p50_ratio"] > 0 and data["call_p99_ratio"] > 0
    for side in ("raw", "bus"):
        cpu = data["cpu_us_per_call"][side]
        assert cpu["client"] >= 0 and cpu["server"] >= 0  # clock ticks: a tiny run may show 0
    assert data["raw_oneway_per_s"] > 0 and data["bus_oneway_per_s"] > 0
    assert data["oneway_rate_ratio"] > 0
    assert data["ring_lookup_us"] > 0
    assert 0 < data["ring_lookup_fraction_of_call_p50"] < 1
    assert set(data["checks"]) == {"call_p50_ratio", "oneway_rate_ratio", "ring_lookup_fraction_of_call_p50"}


@pytest.mark.slow
def test_failover_small(rabbitmq: Any, fresh_database: str, tmp_path: Any) -> None:
    data = bench("failover", "--small", "--broker-url", rabbitmq.url, "--database-url", fresh_database,
                 "--log-dir", str(tmp_path))
    assert data["benchmark"] == "failover"
    assert data["params"]["rounds"] == 1
    timeout = data["params"]["heartbeat_timeout_s"]
    assert timeout > 0
    kill9, _ = worst_and_mean(data, "kill9_convergence_s")
    sigterm, _ = worst_and_mean(data, "sigterm_convergence_s")
    assert kill9 > 0 and sigterm > 0
    assert worst_and_mean(data, "kill9_over_heartbeat_timeout")[0] == pytest.approx(kill9 / timeout, abs=1e-2)
    assert worst_and_mean(data, "kill9_over_target")[0] == pytest.approx(kill9 / 6.0, abs=1e-2)
    rss, _ = worst_and_mean(data, "idle_rss_mib")
    assert 5 < rss < 2048
    assert set(data["checks"]) == {"kill9_convergence_s", "sigterm_convergence_s"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hosts_small(rabbitmq: Any, fresh_database: str, tmp_path: Any) -> None:
    data = bench("hosts", "--small", "--broker-url", rabbitmq.url, "--database-url", fresh_database,
                 "--log-dir", str(tmp_path))
    assert data["benchmark"] == "hosts"
    assert data["params"] == {"mns": 3, "hosts": 300, "interval_s": 1.0, "rounds": 5}
    steady = data["steady"]
    assert steady["lag_source"] == "metrics"
    assert sum(mn["hosts"] for mn in steady["per_mn"].values()) == 300
    for stats in [steady["lag"]] + [mn["lag"] for mn in steady["per_mn"].values()]:
        assert stats["count"] > 0 and 0 <= stats["p50_s"] <= stats["p99_s"] <= stats["max_s"]
    assert steady["pings_per_interval_per_host"] > 0
    assert steady["cpu_s_per_s"]["mns"] >= 0 and steady["cpu_s_per_s"]["postgresql"] is not None
    failover = data["failover"]
    assert 0 < failover["convergence_s"] <= failover["takeover_s"] + 1 and failover["hosts_moved"] > 0
    assert sum(mn["hosts"] for mn in data["after_failover"]["per_mn"].values()) == 300
    assert set(data["checks"]) == {"p99_lag_at_most_interval", "every_host_pinged_every_interval",
                                   "takeover_within_convergence_plus_interval"}


@pytest.mark.slow
def test_api_small(rabbitmq: Any, fresh_database: str, tmp_path: Any) -> None:
    data = bench("api", "--small", "--broker-url", rabbitmq.url, "--database-url", fresh_database,
                 "--log-dir", str(tmp_path))
    assert data["benchmark"] == "api"
    params = data["params"]
    assert params["rounds"] == 1
    assert params["ops_per_configuration"] == params["vms"] * params["cycles"] * 2 > 0
    assert params["cpu_sources"] == {"rabbitmq_pid_found": True, "postgresql_pid_found": True}
    for name, mns in (("mns_1", 1), ("mns_3", 3)):
        config = data[name]
        assert config["mns"] == mns
        assert config["ops"] == params["ops_per_configuration"] and config["failed"] == 0, config["first_failure"]
        assert config["vms_not_running_after"] == 0
        for rate in ("ops_per_s", "create_per_s"):
            assert worst_and_mean(config, rate)[0] > 0, rate
        assert 0 < config["latency"]["p50_ms"] <= config["latency"]["p99_ms"]
        assert config["latency"]["count"] == config["ops"]
        cpu = config["cpu_s_per_1000_ops"]
        assert set(cpu) == {"mns", "rabbitmq", "postgresql", "client", "total"}
        assert all(cpu[part] >= 0 for part in cpu)  # clock ticks: a tiny run may show 0 for one part
        assert cpu["total"] == pytest.approx(cpu["mns"] + cpu["rabbitmq"] + cpu["postgresql"], abs=0.01)
    one, three = data["mns_1"]["ops_per_s"]["mean"], data["mns_3"]["ops_per_s"]["mean"]
    assert worst_and_mean(data, "ops_per_s_3_over_1")[1] == pytest.approx(three / one, rel=0.02)
    assert set(data["checks"]) == {"no_failed_jobs", "every_op_completed", "vms_running_after_cycles"}
    assert data["targets_met"] is True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_faults_one_scenario(tmp_path: Any) -> None:
    data = bench("faults", "--only", "lone-sigstop", "--log-dir", str(tmp_path))
    assert data["benchmark"] == "faults"
    (scenario,) = data["scenarios"]
    assert scenario["scenario"] == "lone-sigstop" and scenario["new_uuid"] is True
    assert 0 < scenario["evicted_after_s"] < 60
    assert scenario["answers_as_old_owner_after_eviction"] == 0


def test_faults_names_an_unknown_scenario() -> None:
    result = CliRunner().invoke(main, ["faults", "--only", "lone-meteor"])
    assert result.exit_code != 0
    assert "lone-meteor" in result.output and "lone-sigstop" in result.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_api_scale_small(rabbitmq: Any, fresh_database: str, tmp_path: Any) -> None:
    data = bench("api-scale", "--small", "--broker-url", rabbitmq.url, "--database-url", fresh_database,
                 "--log-dir", str(tmp_path))
    assert data["benchmark"] == "api-scale"
    params = data["params"]
    assert (params["hosts"], params["vms"], params["storm"]) == (50, 1000, 200)
    assert params["cpu_sources"] == {"rabbitmq_pid_found": True, "postgresql_pid_found": True}
    assert data["setup"]["hosts_over_capacity"] == 0 and data["setup"]["hosts_used_unlike_their_vms"] == 0
    floor = data["floor"]
    assert floor["floor_ms"] == pytest.approx(
        floor["agent_ms"] + floor["pika_round_trip_p50_ms"] + floor["psycopg2_commit_p50_ms"], abs=0.01)
    for name, mns in (("mns_1", 1), ("mns_3", 3)):
        jobs = data["jobs"][name]
        assert jobs["mns"] == mns and jobs["succeeded"] == params["jobs"] and jobs["failed"] == 0
        assert jobs["jobs_per_s"] > 0 and 0 < jobs["latency"]["p50_ms"] <= jobs["latency"]["p99_ms"]
        cpu = jobs["cpu_ms_per_job"]
        assert set(cpu) == {"mns", "rabbitmq", "postgresql", "client", "total"}
        assert cpu["total"] == pytest.approx(cpu["mns"] + cpu["rabbitmq"] + cpu["postgresql"], abs=0.01)
    by_uuid = data["reads"]["get_by_uuid"]
    assert by_uuid["errors"] == 0 and by_uuid["count"] == params["gets"]
    listing = data["reads"]["list"]
    assert listing["rows_seen"] == listing["rows_expected"] >= params["vms"]
    assert listing["mn_memory_mib_after"]["rss"] > 5
    storm = data["storm"]
    assert storm["accepted"] + storm["refused"] == storm["creates"] == params["storm"]
    assert storm["succeeded"] + storm["failed"] + storm["lost"] == storm["accepted"] > 0
    assert storm["lost"] == 0 and storm["doubled"] == 0
    assert storm["hosts_over_capacity"] == 0 and storm["hosts_used_unlike_their_vms"] == 0
    tracking = data["host_tracking"]
    assert tracking["steady"]["per_mn"] and tracking["failover"]["hosts_moved"] > 0
    assert set(tracking["checks"]) == {"p99_lag_at_most_interval", "every_host_pinged_every_interval",
                                       "takeover_within_convergence_plus_interval"}
    assert {k for k in data["checks"] if k.startswith("host_tracking.")} == {
        f"host_tracking.{k}" for k in tracking["checks"]}
