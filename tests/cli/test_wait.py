"""Waiting for a job: the long-poll loop's outcomes and the progress line (pure logic, a plain fake client)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from zstack_cli.cli import CliError, Progress, State, finish
from zstack_cli.client import ApiClient, JobFailed, JobTimeout, RequestFailed

JOB_ID = "f" * 32


class ScriptedJobs(ApiClient):
    """get_job answers the given states in turn (the last one repeats)."""

    def __init__(self, *states: str, error: dict[str, str] | None = None) -> None:
        super().__init__()
        self.states = list(states)
        self.error = error
        self.waits: list[float | None] = []

    def get_job(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        self.waits.append(wait)
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"id": job_id, "operation": "vm.start", "state": state,
                "error": self.error if state == "Failed" else None}


def test_waits_until_succeeded_reporting_each_state() -> None:
    client = ScriptedJobs("Pending", "Running", "Succeeded")
    seen: list[str] = []
    job = client.wait_job(JOB_ID, on_progress=lambda j, _t: seen.append(j["state"]))
    assert job["state"] == "Succeeded"
    assert seen == ["Pending", "Running", "Succeeded"]
    assert client.waits[0] is None and all(w and 1 <= w <= 60 for w in client.waits[1:])  # long polls


def test_a_failed_job_raises_with_its_code_and_message() -> None:
    client = ScriptedJobs("Running", "Failed", error={"code": "host_has_vms", "message": "2 VMs on it"})
    with pytest.raises(JobFailed, match="host_has_vms: 2 VMs on it") as failed:
        client.wait_job(JOB_ID)
    assert failed.value.job["state"] == "Failed"


def test_gives_up_after_the_timeout_saying_how_to_resume() -> None:
    with pytest.raises(JobTimeout, match=f"zstack-cli jobs wait {JOB_ID}"):
        ScriptedJobs("Running").wait_job(JOB_ID, timeout=0.05)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_updates_one_line_on_a_tty_and_clears_it() -> None:
    stream = Tty()
    progress = Progress(stream)
    progress.update({"id": JOB_ID, "operation": "vm.create", "state": "Pending"}, 0.2)
    progress.update({"id": JOB_ID, "operation": "vm.create", "state": "Running"}, 3.4)
    progress.clear()
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 4
    assert f"job {JOB_ID} vm.create Pending 0s" in text and "Running 3s" in text
    assert text.endswith("\r") and text.rsplit("\r", 2)[1].strip() == ""


def test_no_progress_when_stderr_is_not_a_tty() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    progress.update({"id": JOB_ID, "operation": "vm.stop", "state": "Running"}, 1.0)
    progress.clear()
    assert stream.getvalue() == ""


class Interrupted(ApiClient):
    def wait_job(self, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise KeyboardInterrupt


def test_ctrl_c_while_waiting_says_the_job_goes_on() -> None:
    with pytest.raises(CliError) as err:
        finish(State(Interrupted(), "table"), {"id": JOB_ID, "state": "Running"}, True, 60)
    assert err.value.exit_code == 130
    assert f"zstack-cli jobs wait {JOB_ID}" in err.value.format_message()


class FlakyMn(ScriptedJobs):
    """Unreachable (or 503) for the first `outages` polls, then answers the scripted states."""

    def __init__(self, outages: list[RequestFailed], *states: str) -> None:
        super().__init__(*states)
        self.outages = outages

    def get_job(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        if wait is not None and self.outages:
            raise self.outages.pop(0)
        return super().get_job(job_id, wait)


def test_an_mn_outage_while_waiting_is_ridden_out() -> None:
    client = FlakyMn([RequestFailed("cannot reach"), RequestFailed("not serving", status=503)], "Running", "Succeeded")
    assert client.wait_job(JOB_ID)["state"] == "Succeeded"


def test_a_lasting_outage_or_a_4xx_while_waiting_is_raised() -> None:
    with pytest.raises(RequestFailed, match="cannot reach"):
        FlakyMn([RequestFailed("cannot reach")] * 100, "Running").wait_job(JOB_ID, outage_grace=0.5)
    with pytest.raises(RequestFailed, match="no such job"):
        FlakyMn([RequestFailed("no such job", status=404)], "Running").wait_job(JOB_ID)
