"""The devcluster state file ``DIR/state.json``: chosen ports and the processes ``up`` started."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"


@dataclass
class ProcRecord:
    """A started process: pid plus its kernel start time, so a recycled pid is never mistaken for it."""

    pid: int
    start_time: int
    argv: list[str]
    log: str


@dataclass
class State:
    """Ports (by name), process records (by component name, in start order) and the node in use."""

    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, ProcRecord] = field(default_factory=dict)
    node: str = "containers"  # the node kind; an older checkout may have recorded "process"
    node_index: int | None = None  # the container node's network number (containernode.network)
    sysctls: dict[str, str] = field(default_factory=dict)  # what the container node's kubelet found


def load(root: Path) -> State:
    """Read ``root/state.json``; an absent file is an empty state."""
    path = root / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return State()
    procs = {name: ProcRecord(**rec) for name, rec in raw.get("procs", {}).items()}
    return State(ports=dict(raw.get("ports", {})), procs=procs, node=raw.get("node", "containers"),
                 node_index=raw.get("node_index"), sysctls=dict(raw.get("sysctls", {})))


def save(root: Path, state: State) -> None:
    """Write the state atomically (temp file + rename)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{STATE_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, root / STATE_FILE)


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root`` so two ``up``/``down`` runs never interleave."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
