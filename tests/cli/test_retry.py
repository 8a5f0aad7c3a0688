"""Idempotency keys and retries, against a scripted fake MN on 127.0.0.1 (no real MN needed)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from tests.cli.fakemn import LOST, Answer, FakeMn, accepted, job, refused
from zstack_cli.cli import main
from zstack_cli.client import ApiClient, RequestFailed, RetryPolicy
from zstack_devcluster.ports import free_port

pytestmark = pytest.mark.timeout(60)

KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def client(mn: FakeMn, timeout: float = 5.0, policy: RetryPolicy | None = None) -> tuple[ApiClient, list[float]]:
    """A client of `mn` that records its retry delays instead of sleeping them."""
    api = ApiClient(mn.url, "t0ken", timeout, retry=policy)
    delays: list[float] = []
    api.sleep = delays.append
    return api, delays


@pytest.mark.parametrize("lost", LOST)
def test_a_lost_answer_is_retried_with_the_same_key(lost: str) -> None:
    with FakeMn(lost, accepted(replayed=True)) as mn:
        api, delays = client(mn, timeout=0.5)
        told: list[str] = []
        api.on_retry = told.append
        created = api.create_vm("web", 1, 64)
    assert created["id"] == "c" * 32
    keys = mn.keys("POST")
    assert len(keys) == 2 and keys[0] == keys[1] and KEY_RE.match(keys[0] or ""), keys
    assert [s.body for s in mn.seen] == [{"name": "web", "cpu": 1, "memory": 64}] * 2
    assert delays == [0.5]
    assert "retrying in 0.5s (attempt 2 of 5)" in told[0] and "accepted an earlier attempt" in told[1]


def test_a_refused_connection_is_retried_until_the_mn_is_up() -> None:
    port = free_port()
    api = ApiClient(f"http://127.0.0.1:{port}", None, 5.0)
    started: list[FakeMn] = []
    api.sleep = lambda _delay: started.append(FakeMn(accepted(), port=port).__enter__()) if not started else None
    try:
        assert api.delete_host("a" * 32)["id"] == "c" * 32
    finally:
        for mn in started:
            mn.__exit__()
    assert len(started) == 1 and [s.method for s in started[0].seen] == ["DELETE"]
    assert KEY_RE.match(started[0].keys()[0] or "")


def test_each_command_sends_a_fresh_key() -> None:
    with FakeMn(accepted()) as mn:
        api, _ = client(mn)
        api.vm_action("b" * 32, "stop")
        api.vm_action("b" * 32, "stop")
        api.reconnect_host("a" * 32)
        api.delete_host("a" * 32)
    keys = mn.keys()
    assert len(set(keys)) == 4 and all(KEY_RE.match(k or "") for k in keys)


def test_reads_carry_no_key_and_a_lost_read_is_not_retried() -> None:
    with FakeMn("drop") as mn:
        api, delays = client(mn)
        with pytest.raises(RequestFailed) as failed:
            api.list_vms()
        with pytest.raises(RequestFailed):
            api.ping_host("a" * 32)  # a ping is a read: no key, nothing to do twice
    assert failed.value.transport and delays == []
    assert [(s.method, s.headers.get("idempotency-key")) for s in mn.seen] == [("GET", None), ("POST", None)]


@pytest.mark.parametrize("status", [503, 429])
def test_503_and_429_are_retried_after_retry_after_for_reads_and_writes(status: int) -> None:
    busy = refused(status, "unavailable", "busy", retry_after="2")
    with FakeMn(busy, Answer(200, {"vms": []}), busy, accepted()) as mn:
        api, delays = client(mn)
        assert api.list_vms() == []
        assert api.create_vm("web", 1, 64)["id"] == "c" * 32
    assert delays == [2.0, 2.0]
    post_keys = mn.keys("POST")
    assert len(post_keys) == 2 and post_keys[0] == post_keys[1]


def test_retries_are_bounded_by_attempts_and_the_error_is_the_last_answer() -> None:
    with FakeMn(refused(503, "unavailable", "the broker is unreachable", retry_after="0")) as mn:
        api, delays = client(mn)
        with pytest.raises(RequestFailed, match="the broker is unreachable") as failed:
            api.create_vm("web", 1, 64)
    assert len(mn.seen) == 5 and delays == [0.0] * 4 and failed.value.status == 503
    assert failed.value.exit_code == 1


def test_a_retry_after_past_the_budget_is_not_waited_for() -> None:
    with FakeMn(refused(429, "too_many_waiters", "too many", retry_after="3600")) as mn:
        api, delays = client(mn, policy=RetryPolicy(budget=60))
        with pytest.raises(RequestFailed, match="too many"):
            api.get_job("c" * 32)
    assert len(mn.seen) == 1 and delays == []


def test_transport_backoff_doubles() -> None:
    with FakeMn("drop") as mn:
        api, delays = client(mn, policy=RetryPolicy(attempts=4, first_delay=0.25))
        with pytest.raises(RequestFailed, match="cannot reach"):
            api.add_host("h", 1, 1)
    assert delays == [0.25, 0.5, 1.0] and len(set(mn.keys())) == 1 and len(mn.seen) == 4


@pytest.mark.parametrize(("status", "code"), [(400, "bad_type"), (404, "not_found"), (409, "conflict"),
                                              (422, "idempotency_key_reused"), (500, "internal_error")])
def test_other_errors_are_never_retried(status: int, code: str) -> None:
    with FakeMn(refused(status, code, f"{code} here", retry_after="0")) as mn:
        api, delays = client(mn)
        with pytest.raises(RequestFailed, match=f"{code} here"):
            api.create_vm("web", 1, 64)
    assert len(mn.seen) == 1 and delays == []


def test_the_cli_retries_a_dropped_create_and_says_so_on_stderr() -> None:
    with FakeMn("drop", accepted(replayed=True)) as mn:
        result = CliRunner().invoke(main, ["--url", mn.url, "-o", "json", "vms", "create", "web", "--cpu", "1",
                                           "--memory", "64", "--no-wait"])
    assert result.exit_code == 0, result.output
    assert '"id": "' + "c" * 32 in result.stdout
    keys = mn.keys("POST")
    assert len(keys) == 2 and keys[0] == keys[1]
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "POST /v1/vms: cannot reach" in lines[0] and "retrying in 0.5s" in lines[0]
    assert "Idempotent-Replayed" in lines[1]


def test_the_cli_shows_a_422_naming_the_header_and_exits_2() -> None:
    reused = refused(422, "idempotency_key_reused", "Idempotency-Key: 'k' was already used for a different request",
                     field_name="Idempotency-Key")
    with FakeMn(reused) as mn:
        result = CliRunner().invoke(main, ["--url", mn.url, "hosts", "delete", "a" * 32])
    assert result.exit_code == 2 and len(mn.seen) == 1
    assert result.stderr.startswith("error: Idempotency-Key: ") and "retrying" not in result.stderr


def test_server_text_in_retry_notes_and_errors_is_escaped() -> None:
    evil = "\x1b[2J\x1b]0;pwned\x07 \u202eevil"
    with FakeMn(refused(503, "unavailable", evil, retry_after="0"), refused(409, "conflict", evil)) as mn:
        result = CliRunner().invoke(main, ["--url", mn.url, "vms", "stop", "b" * 32])
    assert result.exit_code == 2 and len(mn.seen) == 2
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\u202e" not in result.stderr
    assert "\\x1b[2J\\x1b]0;pwned\\x07 \\u202eevil" in result.stderr
    assert result.stderr.count("\n") == 2  # one retry note and the error, each one line


def test_a_job_that_was_accepted_before_the_drop_is_waited_for() -> None:
    done = dict(job(state="Succeeded"), result={"uuid": "b" * 32})
    with FakeMn("reset", accepted(replayed=True), Answer(200, done)) as mn:
        result = CliRunner().invoke(main, ["--url", mn.url, "-o", "json", "vms", "start", "b" * 32])
    assert result.exit_code == 0, result.output
    assert [s.method for s in mn.seen] == ["POST", "POST", "GET"]
    assert mn.seen[2].path == f"/v1/jobs/{'c' * 32}"
