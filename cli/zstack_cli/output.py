"""What `zstack-cli` prints: aligned tables and records for people, JSON with `-o json` for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

Json = dict[str, Any]
Column = tuple[str, Callable[[Json], Any]]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _used_of(used: str, capacity: str) -> Callable[[Json], str]:
    return lambda row: f"{_text(row.get(used))}/{_text(row.get(capacity))}"


def _error(row: Json) -> str:
    error = row.get("error")
    if not error:
        return ""
    if isinstance(error, dict):
        return f"{error.get('code', 'error')}: {error.get('message', '')}".rstrip(": ")
    return str(error)


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
    width = max(len(k) for k in keys) + 1
    lines = []
    for key in keys:
        value = _error(doc) if key == "error" and doc.get("error") else _text(doc[key])
        lines.append(f"{key + ':':<{width}} {value}")
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
    lines = [f"  {m}{'  (self)' if m == me else ''}" for m in members]
    return "\n".join([head, f"members ({len(members)}):", *lines])


def owner_record(doc: Json) -> str:
    return record(doc, ("resource", "owner", "epoch"))


def ping_record(doc: Json) -> str:
    return record(doc, ("uuid", "reachable", "error", "tracked_by", "seconds"))


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2)


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
