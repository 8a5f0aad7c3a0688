"""What `zstack-cli` prints: aligned tables and records for people, JSON with `-o json` for scripts.

Names and messages come from the MNs, which may hold anything an old row or another client wrote, so
every text shown escapes what a terminal would act on: control characters become `\\x1b`, `\\n` and
the like, bidi controls and line separators `\\u202e`, `\\u2028`. JSON escapes all non-ASCII.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

Json = dict[str, Any]
Column = tuple[str, Callable[[Json], Any]]

BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
LINE_SEPARATORS = frozenset("\u2028\u2029")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escape_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def unsafe(char: str) -> bool:
    """Whether a terminal could act on `char`: a control (Cc), bidi control or line/paragraph separator."""
    return unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS or char in LINE_SEPARATORS


def escape(text: str) -> str:
    """`text` with every unsafe character written as an escape (`\\x1b`, `\\n`, `\\u202e`)."""
    return _UNSAFE_RE.sub(lambda match: _escape_char(match.group()), text)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)  # ASCII: nothing to escape
    return escape(str(value))


def _used_of(used: str, capacity: str) -> Callable[[Json], str]:
    return lambda row: f"{_text(row.get(used))}/{_text(row.get(capacity))}"


def _error(row: Json) -> str:
    error = row.get("error")
    if not error:
        return ""
    if isinstance(error, dict):
        return escape(f"{error.get('code', 'error')}: {error.get('message', '')}".rstrip(": "))
    return escape(str(error))


HOST_COLUMNS: list[Column] = [
    ("UUID", lambda r: r.get("uuid")),
    ("NAME", lambda r: r.get("name")),
    ("STATE", lambda r: r.get("state")),
    ("CPU USED/CAP", _used_of("cpu_used", "cpu_capacity")),
    ("MEMORY MiB USED/CAP", _used_of("memory_used", "memory_capacity")),
    ("VERSION", lambda r: r.get("version")),
]

VM_COLUMNS: list[Column] = [
    ("UUID", lambda r: r.get("uuid")),
    ("NAME", lambda r: r.get("name")),
    ("STATE", lambda r: r.get("state")),
    ("CPU", lambda r: r.get("cpu")),
    ("MEMORY MiB", lambda r: r.get("memory")),
    ("HOST", lambda r: r.get("host_uuid")),
    ("VERSION", lambda r: r.get("version")),
]

JOB_COLUMNS: list[Column] = [
    ("ID", lambda r: r.get("id")),
    ("OPERATION", lambda r: r.get("operation")),
    ("RESOURCE", lambda r: r.get("resource_uuid")),
    ("STATE", lambda r: r.get("state")),
    ("MN", lambda r: r.get("mn")),
    ("CREATED", lambda r: r.get("created_at")),
    ("ERROR", _error),
]

COLUMNS: dict[str, list[Column]] = {"hosts": HOST_COLUMNS, "vms": VM_COLUMNS, "jobs": JOB_COLUMNS}


def table(rows: Sequence[Json], columns: Sequence[Column]) -> str:
    """Rows under a header, each column as wide as its widest cell (no trailing blanks)."""
    cells = [[header for header, _ in columns]]
    cells += [[_text(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines)


def record(doc: Json, order: Sequence[str] = ()) -> str:
    """One object as `key: value` lines: `order` first, then the remaining keys as they come."""
    keys = [k for k in order if k in doc] + [k for k in doc if k not in order]
    if not keys:
        return ""
    width = max(len(escape(str(k))) for k in keys) + 1
    lines = []
    for key in keys:
        value = _error(doc) if key == "error" and doc.get("error") else _text(doc[key])
        lines.append(f"{escape(str(key)) + ':':<{width}} {value}")
    return "\n".join(lines)


JOB_ORDER = ("id", "operation", "resource_uuid", "state", "error", "mn", "created_at", "updated_at", "finished_at",
             "parameters", "result")


def job_record(job: Json) -> str:
    return record(job, JOB_ORDER)


def ring_record(ring: Json) -> str:
    """The ring: this MN, the epoch and one member per line (this MN marked)."""
    me = ring.get("self")
    head = record({k: v for k, v in ring.items() if k != "members"}, ("self", "epoch", "state"))
    members = ring.get("members") or []
    lines = [f"  {_text(m)}{'  (self)' if m == me else ''}" for m in members]
    return "\n".join([head, f"members ({len(members)}):", *lines])


def owner_record(doc: Json) -> str:
    return record(doc, ("resource", "owner", "epoch"))


def ping_record(doc: Json) -> str:
    return record(doc, ("uuid", "reachable", "error", "tracked_by", "seconds"))


def as_json(data: Any) -> str:
    """Indented JSON, ASCII only: control, bidi and every other non-ASCII character is a \\u escape."""
    return json.dumps(data, indent=2, ensure_ascii=True)


def render(data: Any, output: str, kind: str) -> str:
    """Text for `data`: JSON as is, or a table (lists) / record (one object) shaped by `kind`.

    kind is one of hosts, vms, jobs (lists), host, vm, job, ring, owner, ping (single objects).
    """
    if output == "json":
        return as_json({kind: data} if kind in COLUMNS else data)
    if kind in COLUMNS:
        return table(data, COLUMNS[kind])
    if kind == "job":
        return job_record(data)
    if kind == "ring":
        return ring_record(data)
    if kind == "owner":
        return owner_record(data)
    if kind == "ping":
        return ping_record(data)
    return record(data, ("uuid", "name", "state"))
