"""Membership under real faults of the shared broker and database, and of one MN alone (docs/ARCHITECTURE.md,
"Membership states"). The scenarios are zstack-bench's (`zstack-bench faults`); here they must pass.

A shared outage blames nobody: the same UUIDs, the same ring, and every accepted job finished. One MN cut off
alone is evicted by the others within the timeout, answers nothing as owner once evicted, and rejoins anew.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from zstack_bench.faults import INTERVAL, LONE_FAULTS, TIMEOUT, FaultCluster, lone_cut, shared_outage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def faults(fresh_vhost: str, fresh_database: str, tmp_path: Path) -> Iterator[FaultCluster]:
    cluster = FaultCluster(fresh_vhost, fresh_database, tmp_path).start()
    try:
        yield cluster
    finally:
        cluster.close()


def report(figures: dict) -> None:
    print("figures:", figures)


@pytest.mark.parametrize("seconds", [5, 30])
@pytest.mark.parametrize("dependency", ["rabbitmq", "postgres"])
def test_a_shared_outage_changes_no_uuid_and_loses_no_job(faults: FaultCluster, dependency: str, seconds: int,
                                                          request: pytest.FixtureRequest, seed: int) -> None:
    server = request.getfixturevalue(dependency)
    figures = shared_outage(faults, server, seconds, seed, say=print)
    report(figures)
    assert figures["all_suspended_after_s"] is not None, "every MN stops serving while the dependency is gone"
    assert figures["uuid_changes"] == 0 and figures["keys_moved"] == 0.0, faults.logs()
    assert figures["ring_agreement_after_return_s"] <= 5.0, faults.logs()
    assert figures["jobs_lost"] == 0 and figures["jobs_failed"] == 0, faults.logs()
    assert set(figures["api_statuses"]) <= {"202", "503"}, "new work during an outage: 503, never a 500"
    assert figures["unavailable_without_retry_after"] == 0, "every 503 says when to retry"
    if dependency == "rabbitmq":
        assert set(figures["read_statuses"]) == {"200"}, "reads need only the database"


@pytest.mark.parametrize("fault", LONE_FAULTS)
def test_one_mn_cut_off_alone_is_evicted_and_never_answers_as_owner_after(faults: FaultCluster, fault: str) -> None:
    figures = lone_cut(faults, fault, say=print)
    report(figures)
    assert figures["evicted_after_s"] <= TIMEOUT + 2 * INTERVAL, faults.logs()
    assert figures["answers_as_old_owner_after_eviction"] == 0
    assert figures["last_answer_as_old_owner_s"] < figures["evicted_after_s"]
    if fault != "sigstop":  # a frozen process reports nothing; it cannot act either
        assert figures["suspended_after_s"] is not None
        assert figures["suspended_after_s"] < figures["evicted_after_s"], "it stops acting before the others take over"
    assert figures["new_uuid"] and figures["members"] == 3, faults.logs()
