"""`zstack-bench`: benchmarks that print one JSON object each (progress goes to stderr)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from zstack_node.ring import DEFAULT_VNODES


def progress(message: str) -> None:
    click.echo(message, err=True)


def emit(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, indent=2))


def pick(value: Any, small: bool, small_value: Any, full_value: Any) -> Any:
    """An explicit option wins; otherwise the small or the full size."""
    if value is not None:
        return value
    return small_value if small else full_value


@click.group(context_settings={"max_content_width": 110})
def main() -> None:
    """Benchmarks of the management node runtime, as ratios to baselines measured in the same run."""


@main.command()
@click.option("--small", is_flag=True, help="CI smoke size: 20k keys, 2 seeds")
@click.option("--mns", type=click.IntRange(2), default=10, show_default=True, help="MNs in the ring")
@click.option("--keys", type=click.IntRange(1), default=None, help="Random resource UUIDs [100000; small 20000]")
@click.option("--seeds", type=click.IntRange(1), default=None, help="Seeds 1..n to repeat over [5; small 2]")
@click.option("--vnodes", type=click.IntRange(1), default=DEFAULT_VNODES, show_default=True,
              help="Virtual nodes per MN")
def ring(small: bool, mns: int, keys: int | None, seeds: int | None, vnodes: int) -> None:
    """Balance and moves of our Ring against jump consistent hash on the same keys."""
    from zstack_bench import ring as ring_bench

    keys = pick(keys, small, 20_000, 100_000)
    seeds = pick(seeds, small, 2, 5)
    emit(ring_bench.run(mns, keys, range(1, seeds + 1), vnodes, progress=progress))


def broker_option(func: Any) -> Any:
    return click.option("--broker-url", envvar="ZSTACK_BENCH_BROKER_URL", show_envvar=True, default=None,
                        help="RabbitMQ to use; without it a private one is started for the run")(func)


@main.command()
@click.option("--small", is_flag=True, help="CI smoke size: 200 calls, 2000 messages, 2 rounds")
@broker_option
@click.option("--calls", type=click.IntRange(1), default=None, help="Timed calls per side [5000; small 200]")
@click.option("--messages", type=click.IntRange(1), default=None,
              help="Timed one-way messages per side [50000; small 2000]")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Alternating rounds [5; small 2]")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Untimed calls per side first [200; small 50]")
@click.option("--pika-writes/--no-pika-writes", default=True, show_default=True,
              help="The bus's batched socket writes (zstack_node.bus.pika_writes); off measures pika's own path")
def bus(small: bool, broker_url: str | None, calls: int | None, messages: int | None, rounds: int | None,
        warmup: int | None, pika_writes: bool) -> None:
    """CloudBus call and one-way rate against raw pika on the same broker."""
    from zstack_bench import bus as bus_bench
    from zstack_bench.servers import broker

    with broker(broker_url, progress) as url:
        emit(bus_bench.run(url, calls=pick(calls, small, 200, 5000), messages=pick(messages, small, 2000, 50_000),
                           rounds=pick(rounds, small, 2, 5), warmup=pick(warmup, small, 50, 200),
                           progress=progress, pika_writes=pika_writes))


@main.command()
@click.option("--small", is_flag=True, help="CI smoke size: 1 round")
@broker_option
@click.option("--database-url", envvar="ZSTACK_BENCH_DATABASE_URL", show_envvar=True, default=None,
              help="PostgreSQL to use; without it a private one is started for the run")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Rounds, each with 3 fresh MNs [3; small 1]")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the MN logs here (default: a temp dir, removed after a successful run)")
def failover(small: bool, broker_url: str | None, database_url: str | None, rounds: int | None,
             log_dir: Path | None) -> None:
    """Ring convergence of 3 zstack-node processes after kill -9 and after SIGTERM; idle RSS."""
    from zstack_bench import failover as failover_bench
    from zstack_bench.servers import broker, database

    with broker(broker_url, progress) as mq, database(database_url, progress) as db:
        emit(failover_bench.run(mq, db, rounds=pick(rounds, small, 1, 3), log_dir=log_dir, progress=progress))


@main.command()
@click.option("--small", is_flag=True, help="CI smoke size: 300 hosts, 5 intervals")
@broker_option
@click.option("--database-url", envvar="ZSTACK_BENCH_DATABASE_URL", show_envvar=True, default=None,
              help="PostgreSQL to use; without it a private one is started for the run")
@click.option("--mns", type=click.IntRange(2), default=3, show_default=True, help="MNs tracking the hosts")
@click.option("--hosts", type=click.IntRange(1), default=None, help="Hosts seeded in the database [10000; small 300]")
@click.option("--interval", type=click.FloatRange(0.05), default=1.0, show_default=True,
              help="ZSTACK_HOST_PING_INTERVAL of the MNs, in seconds")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Intervals in the measured window [20; small 5]")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the MN logs here (default: a temp dir, removed after a successful run)")
def hosts(small: bool, broker_url: str | None, database_url: str | None, mns: int, hosts: int | None,
          interval: float, rounds: int | None, log_dir: Path | None) -> None:
    """Host tracking at scale: ping lag, pings and CPU per MN; kill -9 one MN and time its hosts' takeover."""
    from zstack_bench import host_tracking
    from zstack_bench.servers import broker, database

    with broker(broker_url, progress) as mq, database(database_url, progress) as db:
        emit(host_tracking.run(mq, db, mns=mns, hosts=pick(hosts, small, 300, 10_000), interval=interval,
                               rounds=pick(rounds, small, 5, 20), log_dir=log_dir, progress=progress))


@main.command()
@click.option("--small", is_flag=True, help="CI smoke size: outages of 5 s only")
@click.option("--outage", "outages", type=click.FloatRange(1), multiple=True,
              help="Seconds each shared outage lasts, repeatable [5 and 30; small 5]")
@click.option("--only", multiple=True, help="Run only this scenario (repeatable): rabbitmq-5s, lone-broker, ...")
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the API load's randomness")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the MN logs here (default: a temp dir, removed after the run)")
def faults(small: bool, outages: tuple[float, ...], only: tuple[str, ...], seed: int,
           log_dir: Path | None) -> None:
    """Membership under faults: the broker and the database down for everyone (under API load), and one
    MN cut off from each alone or frozen. UUID changes, keys moved, ring agreement, jobs lost, eviction."""
    import tempfile

    from zstack_bench import faults as faults_bench
    from zstack_devcluster.services import PostgreSQL, RabbitMQ

    outages = outages or pick(None, small, (5.0,), (5.0, 30.0))
    try:
        faults_bench.check_names(only, outages)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from None
    with tempfile.TemporaryDirectory(prefix="zstack-bench-faults-") as tmp:
        work = log_dir or Path(tmp)
        with RabbitMQ(work / "rabbitmq", say=progress) as mq, PostgreSQL(work / "postgres", say=progress) as db:
            emit(faults_bench.run(mq, db, work, outages, seed, progress, only))


@main.command()
@click.option("--small", is_flag=True, help="CI smoke size: 2 hosts, 6 VMs, 1 cycle, 6 in flight, 1 round")
@broker_option
@click.option("--database-url", envvar="ZSTACK_BENCH_DATABASE_URL", show_envvar=True, default=None,
              help="PostgreSQL to use; without it a private one is started for the run")
@click.option("--hosts", type=click.IntRange(1), default=None, help="Hosts added per configuration [4; small 2]")
@click.option("--vms", type=click.IntRange(1), default=None, help="VMs created per configuration [64; small 6]")
@click.option("--cycles", type=click.IntRange(1), default=None, help="Stop/start cycles per VM [4; small 1]")
@click.option("--concurrency", type=click.IntRange(1), default=None, help="Jobs in flight at most [16; small 6]")
@click.option("--rounds", type=click.IntRange(1), default=None,
              help="Alternating rounds of 1 MN and 3 MNs, each with fresh MNs [2; small 1]")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the MN logs here (default: a temp dir, removed after a successful run)")
def api(small: bool, broker_url: str | None, database_url: str | None, hosts: int | None, vms: int | None,
        cycles: int | None, concurrency: int | None, rounds: int | None, log_dir: Path | None) -> None:
    """VM start/stop jobs per second through HTTP, api.portal and the owner MN, with 1 and with 3 MNs."""
    from zstack_bench import api as api_bench
    from zstack_bench.servers import broker, database

    with broker(broker_url, progress) as mq, database(database_url, progress) as db:
        emit(api_bench.run(mq, db, hosts=pick(hosts, small, 2, 4), vms=pick(vms, small, 6, 64),
                           cycles=pick(cycles, small, 1, 4), concurrency=pick(concurrency, small, 6, 16),
                           rounds=pick(rounds, small, 1, 2), log_dir=log_dir, progress=progress))


@main.command("k8s-scale")
@click.option("--small", is_flag=True, help="CI smoke size: 1 round, 10 spec changes")
@click.option("--dev-dir", type=click.Path(file_okay=False, path_type=Path), envvar="ZSTACK_DEV_DIR",
              show_envvar=True, default=None,
              help="A running devcluster with a container node (`zstack-dev up --node containers`) to use; without "
                   "it a private one is started for the run (needs root and `zstack-dev images` first)")
@click.option("--broker-url", envvar="ZSTACK_BENCH_BROKER_URL", show_envvar=True, default=None,
              help="RabbitMQ to use, at an address the MN pods reach (the host's end of the node's veth, "
                   "100.64.N.1), used as given; without it a private one is started that also listens there")
@click.option("--database-url", envvar="ZSTACK_BENCH_DATABASE_URL", show_envvar=True, default=None,
              help="PostgreSQL to use, at an address the MN pods reach (as --broker-url), used as given; without "
                   "it a private one is started that also listens there")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Rounds of scaling 3 -> 5 -> 3 [3; small 1]")
@click.option("--changes", type=click.IntRange(1), default=None,
              help="Timed spec changes, and as many baseline StatefulSet patches [30; small 10]")
def k8s_scale(small: bool, dev_dir: Path | None, broker_url: str | None, database_url: str | None,
              rounds: int | None, changes: int | None) -> None:
    """The operator on the devcluster: ring convergence after kubectl scale 3 -> 5 -> 3, spec-change latency.

    The MN pods run our node image on the devcluster's container node, and reach this machine only at the
    host's end of the node's veth."""
    from zstack_bench import k8s_scale as k8s_bench
    from zstack_bench.servers import broker, database

    try:
        with k8s_bench.devcluster(dev_dir, progress) as cluster, \
                broker(broker_url, progress, pods=cluster.pod_network) as mq, \
                database(database_url, progress, pods=cluster.pod_network) as db:
            emit(k8s_bench.run(cluster, mq, db, rounds=pick(rounds, small, 1, 3),
                               changes=pick(changes, small, 10, 30), progress=progress))
    except k8s_bench.BenchError as err:
        raise click.ClickException(str(err)) from None


@main.command("api-scale")
@click.option("--small", is_flag=True, help="CI smoke size: 50 hosts, 1000 VMs, storm 200, 100 timed creates")
@broker_option
@click.option("--database-url", envvar="ZSTACK_BENCH_DATABASE_URL", show_envvar=True, default=None,
              help="PostgreSQL to use (a fresh database: hosts and VMs are seeded into it); without it a private "
                   "one is started for the run")
@click.option("--mns", type=click.IntRange(2), default=3, show_default=True, help="MNs of the scaled cluster")
@click.option("--hosts", type=click.IntRange(1), default=None, help="Hosts seeded in SQL [10000; small 50]")
@click.option("--vms", type=click.IntRange(1), default=None, help="Running VMs seeded in SQL [100000; small 1000]")
@click.option("--storm", type=click.IntRange(1), default=None, help="Concurrent creates [10000; small 200]")
@click.option("--jobs", type=click.IntRange(1), default=None,
              help="Timed creates at 1 MN and at --mns MNs [2000; small 100]")
@click.option("--connections", type=click.IntRange(1), default=384, show_default=True,
              help="Storm requests open at once, across the MNs")
@click.option("--seed", type=int, default=16, show_default=True, help="Seed of the seeded UUIDs and the GET sample")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the MN logs here (default: a temp dir, removed after a successful run)")
def api_scale(small: bool, broker_url: str | None, database_url: str | None, mns: int, hosts: int | None,
              vms: int | None, storm: int | None, jobs: int | None, connections: int, seed: int,
              log_dir: Path | None) -> None:
    """The API at scale: jobs/s and CPU per job at 1 and --mns MNs, job latency against the raw floor,
    list pages and GET by UUID over the seeded VMs, and a storm of concurrent creates (lost, doubled,
    hosts over capacity)."""
    from zstack_bench import api_scale as scale_bench
    from zstack_bench import host_tracking
    from zstack_bench.servers import broker, database

    scale = scale_bench.Scale(mns=mns, hosts=pick(hosts, small, 50, 10_000), vms=pick(vms, small, 1000, 100_000),
                              storm=pick(storm, small, 200, 10_000), jobs=pick(jobs, small, 100, 2000),
                              gets=pick(None, small, 200, 2000), connections=connections, seed=seed)
    try:
        scale.check()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--vms/--hosts") from None
    with broker(broker_url, progress) as mq, database(database_url, progress) as db:
        tracking = host_tracking.api_scale_section(rounds=pick(None, small, 5, 20))
        emit(scale_bench.run(mq, db, scale, log_dir=log_dir, progress=progress, sections={"host_tracking": tracking}))
