"""`zstack-dev demo`: private RabbitMQ and PostgreSQL plus a ring of MN processes on this machine.

One supervisor process owns everything the demo runs, so `demo down` is a single SIGTERM: the
MNs leave the ring gracefully, then the servers stop. `demo up` starts that supervisor in the
background, waits for the ring, and prints what to try next.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from devcluster.layout import Layout
from devcluster.localnodes import LocalNode, agreed_members, wait_until
from devcluster.progress import Say, Ticker, stderr_say
from devcluster.services import PostgreSQL, RabbitMQ


class DemoError(RuntimeError):
    """The demo could not start; the message says where to look."""


def _paths(root: Path) -> tuple[Path, Path, Path]:
    demo = root / "demo"
    return demo / "supervisor.pid", demo / "ready.json", Layout(root).log("demo")


def _running_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def up(root: Path, replicas: int, timeout: float = 300.0, say: Say = stderr_say) -> dict:
    """Start the supervisor unless it runs; return the ready document once the ring has formed."""
    pid_file, ready_file, log_file = _paths(root)
    if _running_pid(pid_file) and ready_file.exists():
        return json.loads(ready_file.read_text())
    ready_file.unlink(missing_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "devcluster.demo", str(root), str(replicas)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    ticker = Ticker(say)
    while not ready_file.exists():
        if proc.poll() is not None:
            raise DemoError(f"the demo supervisor exited with {proc.returncode}; see {log_file}:\n"
                            + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:]))
        if ticker.elapsed() > timeout:
            raise DemoError(f"the demo was not ready within {timeout:.0f}s; see {log_file}")
        ticker.tick(f"RabbitMQ, PostgreSQL and {replicas} MNs (log {log_file})")
        time.sleep(0.2)
    ticker.done(f"demo ready in {ticker.elapsed():.1f}s")
    return json.loads(ready_file.read_text())


def down(root: Path, timeout: float = 60.0) -> bool:
    """Stop the supervisor (MNs leave gracefully, servers stop). False when nothing ran."""
    pid_file, ready_file, _ = _paths(root)
    pid = _running_pid(pid_file)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: _running_pid(pid_file) is None or not _alive(pid), timeout, "the demo to stop")
    pid_file.unlink(missing_ok=True)
    ready_file.unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def supervise(root: Path, replicas: int) -> None:
    """Run the servers and the MNs until SIGTERM, then take them down in order."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    demo_dir = root / "demo"
    with RabbitMQ(demo_dir / "rabbitmq", say=stderr_say) as broker, \
            PostgreSQL(demo_dir / "postgres", say=stderr_say) as database:
        nodes = [LocalNode(f"mn-{i}", broker.url, database.url, Layout(root).logs) for i in range(replicas)]
        try:
            for node in nodes:
                node.start()
            for node in nodes:
                node.wait_ready(timeout=60)
            members = wait_until(lambda: agreed_members(nodes), 30, "the MNs to agree on one ring")
            ready = {
                "members": sorted(members),
                "nodes": [{"name": n.name, "uuid": n.uuid, "url": n.url, "pid": n.process.pid,
                           "log": str(n.log_path)} for n in nodes],
                "broker": broker.display_url,
                "database": database.display_url,
            }
            ready_file = _paths(root)[1]
            ready_file.write_text(json.dumps(ready, indent=2))
            stderr_say(f"ring of {len(members)} formed; running until SIGTERM")
            while not stop.wait(1.0):
                pass
        finally:
            for node in nodes:
                node.stop()


def print_next_steps(ready: dict) -> None:
    first = ready["nodes"][0]
    click.echo(f"\nA ring of {len(ready['members'])} management nodes is running:")
    for node in ready["nodes"]:
        click.echo(f"  {node['name']}  {node['uuid']}  {node['url']}  (pid {node['pid']}, log {node['log']})")
    click.echo(f"\nbroker {ready['broker']}\ndatabase {ready['database']}")
    click.echo("\nTry next:")
    click.echo(f"  curl -s {first['url']}/v1/cluster/ring          # self, epoch, members")
    click.echo(f"  curl -s {first['url']}/v1/cluster/owner/$(python3 -c 'import uuid;print(uuid.uuid4().hex)')")
    click.echo(f"  curl -s {first['url']}/metrics | grep ^zstack_   # Prometheus metrics")
    click.echo(f"  kill -9 {ready['nodes'][-1]['pid']}  # then watch the ring shrink within ~5 s")
    click.echo("  zstack-bench failover --small       # measured convergence, as JSON")
    click.echo("  make demo-down                      # stop it all")


if __name__ == "__main__":
    supervise(Path(sys.argv[1]), int(sys.argv[2]))
