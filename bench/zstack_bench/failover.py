"""`zstack-bench failover`: how fast 3 `zstack-node` processes drop a killed or leaving member.

Per round: start 3 MNs with default settings and wait until they agree on one ring; kill -9 one
and time until every survivor's /v1/cluster/ring drops it (baseline: the configured heartbeat
timeout, target 6 s); start a replacement and time until all agree again; SIGTERM one and time
the survivors' convergence (target 1 s); read the RSS of an idle MN.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zstack_bench.stats import summary
from zstack_devcluster.localnodes import LocalNode, agreed_members, wait_until
from zstack_node.config import Settings

KILL_TARGET_S = 6.0  # crash detected and dropped by every survivor
LEAVE_TARGET_S = 1.0  # graceful leave seen by every survivor
POLL_S = 0.005

Say = Callable[[str], None]


def configured_heartbeat_timeout() -> float:
    """The timeout the MNs run with: ZSTACK_HEARTBEAT_TIMEOUT if set, else the default setting."""
    default = next(f.default for f in dataclasses.fields(Settings) if f.name == "heartbeat_timeout")
    return float(os.environ.get("ZSTACK_HEARTBEAT_TIMEOUT", default))


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` (VmRSS in /proc/<pid>/status) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def wait_agreed(nodes: Sequence[LocalNode], timeout: float = 30.0) -> float:
    """Wait until every node reports exactly the members `nodes`; return the seconds it took."""
    start = time.monotonic()
    expected = frozenset(node.uuid for node in nodes)
    wait_until(lambda: agreed_members(nodes) == expected, timeout,
               f"{len(nodes)} MNs to agree on one ring of {len(nodes)} members")
    return time.monotonic() - start


def time_until_dropped(survivors: Sequence[LocalNode], gone: str, since: float, timeout: float = 60.0) -> float:
    """Seconds from `since` until every survivor's ring no longer holds `gone` (polled every 5 ms)."""
    dropped: dict[str, float] = {}
    deadline = since + timeout
    while len(dropped) < len(survivors):
        for node in survivors:
            if node.name not in dropped and gone not in node.ring()["members"]:
                dropped[node.name] = time.monotonic() - since
        if time.monotonic() > deadline:
            waiting = sorted({n.name for n in survivors} - set(dropped))
            raise TimeoutError(f"{', '.join(waiting)} still hold MN {gone} {timeout:g}s after it went")
        time.sleep(POLL_S)
    return max(dropped.values())


class Round:
    """One round's MN processes, all stopped at the end."""

    def __init__(self, broker_url: str, database_url: str, log_dir: Path, tag: str) -> None:
        self.broker_url, self.database_url, self.log_dir, self.tag = broker_url, database_url, log_dir, tag
        self.nodes: list[LocalNode] = []

    def start(self) -> LocalNode:
        node = LocalNode(f"{self.tag}-mn{len(self.nodes)}", self.broker_url, self.database_url, self.log_dir)
        self.nodes.append(node.start())
        return node

    def running(self) -> list[LocalNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def close(self) -> None:
        for node in self.running():
            node.stop(timeout=15)


def run_round(broker_url: str, database_url: str, log_dir: Path, tag: str, say: Say) -> dict[str, float]:
    rnd = Round(broker_url, database_url, log_dir, tag)
    try:
        first = [rnd.start() for _ in range(3)]
        for node in first:
            node.wait_ready(60)
        startup = wait_agreed(first)
        say(f"failover {tag}: 3 MNs agree ({startup:.2f}s after ready); kill -9 {first[0].name}")

        victim, survivors = first[0], first[1:]
        gone = victim.uuid
        killed_at = time.monotonic()
        victim.kill()
        kill9 = time_until_dropped(survivors, gone, killed_at)
        say(f"failover {tag}: every survivor dropped it after {kill9:.2f}s; starting a replacement")

        replacement = rnd.start().wait_ready(60)
        join = wait_agreed([*survivors, replacement])
        leaver, stay = survivors[0], [survivors[1], replacement]
        gone = leaver.uuid
        say(f"failover {tag}: 3 MNs agree again ({join:.2f}s after ready); SIGTERM {leaver.name}")
        termed_at = time.monotonic()
        leaver.signal(signal.SIGTERM)
        sigterm = time_until_dropped(stay, gone, termed_at)
        leaver.stop()
        say(f"failover {tag}: every survivor dropped it after {sigterm:.2f}s")

        time.sleep(1.0)  # idle: no traffic but heartbeats
        rss = rss_mib(stay[0].process.pid)
        return {"kill9_convergence_s": kill9, "sigterm_convergence_s": sigterm,
                "startup_agreement_s": startup, "join_agreement_s": join, "idle_rss_mib": rss}
    except Exception:
        for node in rnd.nodes:
            say(f"--- log of {node.name} ({node.log_path}):\n{node.tail(15)}")
        raise
    finally:
        rnd.close()


def run(broker_url: str, database_url: str, rounds: int = 3, log_dir: Path | None = None,
        progress: Say | None = None) -> dict[str, Any]:
    """The benchmark's JSON object."""
    say = progress or (lambda _m: None)
    timeout = configured_heartbeat_timeout()
    scratch = log_dir or Path(tempfile.mkdtemp(prefix="zstack-bench-failover-"))
    per_round = []
    for n in range(1, rounds + 1):
        per_round.append(run_round(broker_url, database_url, scratch, f"r{n}", say))
    if log_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)

    def over_rounds(name: str) -> dict[str, float]:
        return summary([r[name] for r in per_round], digits=3)

    kill9, sigterm = over_rounds("kill9_convergence_s"), over_rounds("sigterm_convergence_s")
    checks = {"kill9_convergence_s": kill9["worst"] <= KILL_TARGET_S,
              "sigterm_convergence_s": sigterm["worst"] <= LEAVE_TARGET_S}
    return {
        "benchmark": "failover",
        "params": {"mns": 3, "rounds": rounds, "heartbeat_timeout_s": timeout},
        "kill9_convergence_s": kill9,
        "kill9_over_heartbeat_timeout": summary([r["kill9_convergence_s"] / timeout for r in per_round], digits=3),
        "kill9_over_target": summary([r["kill9_convergence_s"] / KILL_TARGET_S for r in per_round], digits=3),
        "sigterm_convergence_s": sigterm,
        "sigterm_over_target": summary([r["sigterm_convergence_s"] / LEAVE_TARGET_S for r in per_round], digits=3),
        "startup_agreement_s": over_rounds("startup_agreement_s"),
        "join_agreement_s": over_rounds("join_agreement_s"),
        "idle_rss_mib": over_rounds("idle_rss_mib"),
        "targets": {"kill9_convergence_s": KILL_TARGET_S, "sigterm_convergence_s": LEAVE_TARGET_S},
        "checks": checks,
        "targets_met": all(checks.values()),
    }
