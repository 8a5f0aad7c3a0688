"""What zstack-cli prints, from documents shaped like the API's (pure formatting, no server)."""

from __future__ import annotations

import json
import unicodedata

import pytest

from zstack_cli.output import escape, render, unsafe

HOST = {"uuid": "a" * 32, "name": "h1", "cpu_capacity": 64, "cpu_used": 2, "memory_capacity": 262144,
        "memory_used": 4096, "state": "Connected", "version": 3, "created_at": "2026-11-26T06:00:00Z"}
VM = {"uuid": "b" * 32, "name": "web-1", "cpu": 2, "memory": 4096, "host_uuid": None, "state": "Created",
      "version": 1, "created_at": "2026-11-26T06:00:01Z"}
FAILED_JOB = {"id": "c" * 32, "operation": "vm.start", "resource_uuid": "b" * 32, "parameters": {},
              "state": "Failed", "result": None, "error": {"code": "invalid_state", "message": "VM is Running"},
              "mn": "d" * 32, "created_at": "2026-11-26T06:00:02Z", "updated_at": "2026-11-26T06:00:03Z",
              "finished_at": "2026-11-26T06:00:03Z"}


def test_host_table_has_a_header_and_used_over_capacity() -> None:
    lines = render([HOST], "table", "hosts").splitlines()
    assert lines[0].split()[:3] == ["UUID", "NAME", "STATE"]
    assert lines[1].split() == ["a" * 32, "h1", "Connected", "2/64", "4096/262144", "3"]


def test_table_columns_line_up_and_have_no_trailing_blanks() -> None:
    rows = [dict(VM, name="x"), dict(VM, name="a-much-longer-name", uuid="e" * 32)]
    lines = render(rows, "table", "vms").splitlines()
    state_col = lines[0].index("STATE")
    assert all(line[state_col:].startswith("Created") for line in lines[1:])
    assert all(line == line.rstrip() for line in lines)


def test_missing_values_show_as_a_dash() -> None:
    assert render([VM], "table", "vms").splitlines()[1].split()[5] == "-"  # HOST is null until placed


def test_empty_list_prints_only_the_header() -> None:
    lines = render([], "table", "jobs").splitlines()
    assert len(lines) == 1 and lines[0].startswith("ID")


def test_job_record_puts_state_and_error_first() -> None:
    lines = render(FAILED_JOB, "table", "job").splitlines()
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys[:5] == ["id", "operation", "resource_uuid", "state", "error"]
    assert "invalid_state: VM is Running" in lines[4]
    assert lines[3].split() == ["state:", "Failed"]


def test_job_table_shows_the_error_code() -> None:
    assert "invalid_state: VM is Running" in render([FAILED_JOB], "table", "jobs")


def test_ring_marks_this_mn() -> None:
    me, other = "1" * 32, "2" * 32
    text = render({"self": me, "epoch": 7, "members": [other, me], "state": "serving"}, "table", "ring")
    assert "epoch: 7" in " ".join(text.split())
    assert f"{me}  (self)" in text and f"{other}  (self)" not in text
    assert "members (2):" in text


def test_json_output_is_the_document_and_lists_are_wrapped_by_kind() -> None:
    assert json.loads(render(VM, "json", "vm")) == VM
    assert json.loads(render([HOST], "json", "hosts")) == {"hosts": [HOST]}
    assert json.loads(render(FAILED_JOB, "json", "job")) == FAILED_JOB


def test_ping_record_shows_reachability_first_and_the_error_as_text() -> None:
    answer = {"uuid": "a" * 32, "reachable": False, "error": "host aaa did not answer the ping",
              "tracked_by": "d" * 32, "seconds": 0.0021}
    lines = [line.split(None, 1) for line in render(answer, "table", "ping").splitlines()]
    assert lines == [["uuid:", "a" * 32], ["reachable:", "False"], ["error:", "host aaa did not answer the ping"],
                     ["tracked_by:", "d" * 32], ["seconds:", "0.0021"]]
    assert json.loads(render(answer, "json", "ping")) == answer


# -- escaping: text from the MNs can never drive the terminal ---------------------------------------------

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[31mred", "\\x1b[31mred"),
    ("abc\u202edef", "abc\\u202edef"),
    ("two\nlines\r\tx", "two\\nlines\\r\\tx"),
    ("nul\x00del\x7fc1\x85", "nul\\x00del\\x7fc1\\x85"),
    ("sep\u2028par\u2029", "sep\\u2028par\\u2029"),
    ("caf\u00e9 \u540d\u524d a\\b \U0001f600", "caf\u00e9 \u540d\u524d a\\b \U0001f600"),  # printable: as is
])
def test_escape_writes_unsafe_characters_as_escapes(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_escape_covers_every_control_bidi_and_separator_character() -> None:
    for code in range(0x10000):
        char = chr(code)
        expected = unicodedata.category(char) == "Cc" or char in BIDI or char in "\u2028\u2029"
        assert (escape(char) != char) == expected == unsafe(char), hex(code)


def test_a_hostile_name_cannot_reach_the_terminal_from_a_table_or_record() -> None:
    evil = "\x1b[31mred\x1b]0;title\x07\nfake-row abc\u202edef\u2028"
    host = dict(HOST, name=evil)
    texts = [render([host], "table", "hosts"), render(host, "table", "host"),
             render([dict(VM, name=evil)], "table", "vms"),
             render(dict(FAILED_JOB, error={"code": "x", "message": evil}), "table", "job"),
             render([dict(FAILED_JOB, error={"code": evil, "message": "m"})], "table", "jobs"),
             render({"uuid": "a" * 32, "reachable": False, "error": evil}, "table", "ping"),
             render({"self": evil, "epoch": 1, "members": [evil], "state": "serving"}, "table", "ring")]
    for text in texts:
        assert not any(unsafe(char) for char in text.replace("\n", "")), text
        assert "\\x1b[31mred\\x1b]0;title\\x07\\nfake-row abc\\u202edef\\u2028" in text
    assert len(texts[0].splitlines()) == 2  # the header and one row: the name made no line of its own


def test_escaped_names_keep_the_table_aligned() -> None:
    rows = [dict(VM, name="\x1b[1mbold"), dict(VM, name="plain", uuid="e" * 32)]
    lines = render(rows, "table", "vms").splitlines()
    state_col = lines[0].index("STATE")
    assert all(line[state_col:].startswith("Created") for line in lines[1:])


def test_json_output_escapes_control_and_bidi_characters_and_stays_valid() -> None:
    evil = "\x1b[31mred abc\u202edef \u2028 caf\u00e9"
    text = render([dict(VM, name=evil)], "json", "vms")
    assert text.isascii() and not any(unsafe(char) for char in text.replace("\n", ""))
    assert json.loads(text)["vms"][0]["name"] == evil
    assert "\\u001b[31mred abc\\u202edef \\u2028" in text
