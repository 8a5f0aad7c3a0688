"""Lists a page at a time: --limit, --all, the continue token and the notes on stderr (a scripted fake MN)."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner, Result

from tests.cli.fakemn import Answer, FakeMn, refused
from zstack_cli.cli import PageProgress, main
from zstack_cli.client import ApiClient, RequestFailed

pytestmark = pytest.mark.timeout(60)

HOST = "a" * 32


def vm(n: int) -> dict[str, object]:
    return {"uuid": f"{n:032x}", "name": f"vm-{n}", "cpu": 1, "memory": 64, "host_uuid": HOST, "state": "Running",
            "version": 1, "created_at": "2026-11-26T06:00:00Z"}


def pages(kind: str, *sizes: int) -> list[Answer]:
    """Consecutive pages of `sizes` rows; each but the last carries a continue token."""
    answers, first = [], 0
    for i, size in enumerate(sizes):
        doc: dict[str, object] = {kind: [vm(n) for n in range(first, first + size)]}
        if i < len(sizes) - 1:
            doc["continue"] = f"token-{i + 1}"
        answers.append(Answer(200, doc))
        first += size
    return answers


def cli(mn: FakeMn, *args: str) -> Result:
    return CliRunner().invoke(main, ["--url", mn.url, *args])


def test_a_list_shows_the_first_page_and_says_on_stderr_that_more_remain() -> None:
    with FakeMn(*pages("vms", 100, 50)) as mn:
        result = cli(mn, "vms", "list")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 101 and len(mn.seen) == 1 and mn.seen[0].query == {}
    assert result.stderr.startswith("note: showing the first 100 VMs; more remain")
    assert "--all" in result.stderr and "--limit" in result.stderr


def test_the_last_page_needs_no_note_and_json_stays_one_document() -> None:
    with FakeMn(*pages("hosts", 3)) as mn:
        result = cli(mn, "-o", "json", "hosts", "list", "--limit", "7")
    assert result.exit_code == 0 and result.stderr == ""
    assert len(json.loads(result.stdout)["hosts"]) == 3 and mn.seen[0].query == {"limit": "7"}


def test_all_follows_the_token_with_the_same_filters_and_prints_one_document() -> None:
    with FakeMn(*pages("vms", 2, 2, 1)) as mn:
        result = cli(mn, "-o", "json", "vms", "list", "--all", "--limit", "2", "--state", "running", "--host", HOST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"vms": [vm(n) for n in range(5)]}
    assert result.stderr == ""  # no terminal: no progress line
    filters = {"limit": "2", "state": "Running", "host_uuid": HOST}
    assert [s.query for s in mn.seen] == [filters, {**filters, "continue": "token-1"},
                                          {**filters, "continue": "token-2"}]


def test_jobs_list_all_keeps_the_order_and_filters() -> None:
    with FakeMn(*pages("jobs", 1, 1)) as mn:
        result = cli(mn, "-o", "json", "jobs", "list", "--all", "--resource", HOST, "--state", "failed")
    assert result.exit_code == 0, result.output
    assert [j["uuid"] for j in json.loads(result.stdout)["jobs"]] == [vm(0)["uuid"], vm(1)["uuid"]]
    assert mn.seen[1].query == {"resource_uuid": HOST, "state": "Failed", "continue": "token-1"}


def test_a_stale_token_error_during_the_walk_is_shown_and_exits_2() -> None:
    stale = refused(400, "invalid_value", "continue: the token was issued for other filters", field_name="continue")
    with FakeMn(pages("vms", 1, 1)[0], stale) as mn:
        result = cli(mn, "vms", "list", "--all")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "error: continue: the token was issued for other filters\n"


def test_a_page_that_does_not_move_on_stops_the_walk() -> None:
    with FakeMn(Answer(200, {"vms": [vm(0)], "continue": "same"})) as mn:
        api = ApiClient(mn.url)
        with pytest.raises(RequestFailed, match="does not move on"):
            api.list_all("vms")
    assert len(mn.seen) == 2


def test_iter_pages_and_list_all_report_progress() -> None:
    with FakeMn(*pages("hosts", 3, 3, 2)) as mn:
        api = ApiClient(mn.url)
        counts: list[int] = []
        assert [h["uuid"] for h in api.list_all("hosts", 3, on_page=counts.append)] == [vm(n)["uuid"]
                                                                                        for n in range(8)]
    assert counts == [3, 6, 8]


@pytest.mark.parametrize("limit", ["0", "1001", "ten"])
def test_a_limit_outside_1_to_1000_is_a_usage_error(limit: str) -> None:
    with FakeMn(Answer(200, {"vms": []})) as mn:
        result = cli(mn, "vms", "list", "--limit", limit)
    assert result.exit_code == 2 and "--limit" in result.output and mn.seen == []


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_page_progress_updates_one_line_on_a_tty_and_clears_it() -> None:
    stream = Tty()
    progress = PageProgress("VMs", stream)
    progress.update(1000)
    progress.update(3000)
    progress.clear()
    text = stream.getvalue()
    assert "\n" not in text and "fetched 1000 VMs ..." in text and "fetched 3000 VMs ..." in text
    assert text.endswith("\r") and text.rsplit("\r", 2)[1].strip() == ""


def test_no_page_progress_off_a_tty() -> None:
    stream = io.StringIO()
    progress = PageProgress("hosts", stream)
    progress.update(100)
    progress.clear()
    assert stream.getvalue() == ""
