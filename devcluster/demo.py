"""`zstack-dev demo`: private RabbitMQ and PostgreSQL plus a ring of MN processes on this machine.

One supervisor process owns everything the demo runs, so `demo down` is a single SIGTERM: the
MNs leave the ring gracefully, then the servers stop. `demo up` starts that supervisor in the
background, waits for the ring, and prints what to try next.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import click

from devcluster import procs
from devcluster.layout import Layout
from devcluster.localnodes import LocalNode, agreed_members, wait_until
from devcluster.progress import Say, Ticker, stderr_say
from devcluster.services import PostgreSQL, RabbitMQ
from devcluster.state import ProcRecord


class DemoError(RuntimeError):
    """The demo could not start; the message says where to look."""


def _paths(root: Path) -> tuple[Path, Path, Path]:
    demo = root / "demo"
    return demo / "supervisor.json", demo / "ready.json", Layout(root).log("demo")


def _supervisor(record_file: Path) -> ProcRecord | None:
    """The running supervisor, identified by pid and kernel start time (a reused pid never matches)."""
    try:
        record = ProcRecord(**json.loads(record_file.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return record if procs.record_alive(record) else None


def up(root: Path, replicas: int, timeout: float = 300.0, say: Say = stderr_say) -> dict:
    """Start the supervisor unless it runs; return the ready document once the ring has formed."""
    record_file, ready_file, log_file = _paths(root)
    record = _supervisor(record_file)
    if record is None:
        ready_file.unlink(missing_ok=True)
        record_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "devcluster.demo", str(root), str(replicas)]
        record = procs.spawn(argv, log_file)
        record_file.write_text(json.dumps(asdict(record)))
    ticker = Ticker(say)
    try:
        while not ready_file.exists():
            if not procs.record_alive(record):
                raise DemoError(f"the demo supervisor exited; see {log_file}:\n"
                                + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:]))
            if ticker.elapsed() > timeout:
                raise DemoError(f"the demo was not ready within {timeout:.0f}s; see {log_file}")
            ticker.tick(f"RabbitMQ, PostgreSQL and {replicas} MNs (log {log_file})")
            time.sleep(0.2)
    except BaseException:
        down(root)  # an interrupted or failed start leaves nothing running
        raise
    ticker.done(f"demo ready in {ticker.elapsed():.1f}s")
    return json.loads(ready_file.read_text())


def down(root: Path, grace: float = 60.0) -> bool:
    """Stop the supervisor (MNs leave gracefully, servers stop). False when nothing ran."""
    record_file, ready_file, _ = _paths(root)
    record = _supervisor(record_file)
    if record is not None:
        procs.stop_groups([(record.pid, record.start_time)], grace)
    record_file.unlink(missing_ok=True)
    ready_file.unlink(missing_ok=True)
    return record is not None


def supervise(root: Path, replicas: int) -> None:
    """Run the servers and the MNs until SIGTERM, then take them down in order."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    demo_dir = root / "demo"
    with RabbitMQ(demo_dir / "rabbitmq", say=stderr_say) as broker, \
            PostgreSQL(demo_dir / "postgres", say=stderr_say) as database:
        token_file = _api_token_file(demo_dir)
        env = {"ZSTACK_API_TOKEN": token_file.read_text().strip()}  # env, not a flag: argv is world-readable
        nodes = [LocalNode(f"mn-{i}", broker.url, database.url, Layout(root).logs, env=env) for i in range(replicas)]
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
                "api_token_file": str(token_file),
            }
            ready_file = _paths(root)[1]
            ready_file.write_text(json.dumps(ready, indent=2))
            stderr_say(f"ring of {len(members)} formed; running until SIGTERM")
            while not stop.wait(1.0):
                pass
        finally:
            for node in nodes:
                node.stop()


def _api_token_file(demo_dir: Path) -> Path:
    """The demo's API token: random, made once, readable only by its owner."""
    path = demo_dir / "api-token"
    if not path.exists():
        demo_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    return path


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
    click.echo(f"  export ZSTACK_API_URL={first['url']} ZSTACK_API_TOKEN=$(cat {ready['api_token_file']})")
    click.echo("  zstack-cli hosts add host-1 --cpu 64 --memory 262144")
    click.echo("  zstack-cli vms create vm-1 --cpu 2 --memory 2048   # runs as a durable job; watch it finish")
    click.echo("  zstack-cli vms list;  zstack-cli ring owner <vm uuid>")
    click.echo(f"  kill -9 {ready['nodes'][-1]['pid']}  # then watch the ring shrink within ~5 s")
    click.echo("  zstack-bench failover --small       # measured convergence, as JSON")
    click.echo("  make demo-down                      # stop it all")


if __name__ == "__main__":
    supervise(Path(sys.argv[1]), int(sys.argv[2]))
