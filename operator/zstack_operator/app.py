"""The operator process: log in, serve health and metrics, wait to lead, then run kopf and the Controller.

A replica that loses its leader Lease exits at once with status 1, writes in flight included, so that
Kubernetes restarts it as a fresh standby (as controller-runtime does); the renew deadline is shorter than
the Lease duration, so it is gone before a standby may take over. SIGTERM stops kopf, waits for every write
in flight and only then releases the Lease, so a standby takes over at once and never overlaps with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from datetime import datetime

import kopf

from zstack_kube.errors import KubeError
from zstack_kube.login import login
from zstack_operator import http, metrics
from zstack_operator.controller import Controller
from zstack_operator.events import EventRecorder
from zstack_operator.handlers import build_registry, quiet_kopf_logs
from zstack_operator.kubeapi import Kube
from zstack_operator.leader import LeaderElector, default_identity
from zstack_operator.mn import MN_CLUSTER_ROLE

log = logging.getLogger("zstack_operator")
KOPF_STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class OperatorOptions:
    namespaces: tuple[str, ...]  # empty: all namespaces
    http_bind: str
    http_port: int
    leader_election: bool
    leader_election_namespace: str
    leader_election_id: str
    lease_duration: float
    renew_deadline: float
    retry_period: float
    resync_interval: float
    status_interval: float
    idle_status_interval: float
    mn_cluster_role: str = MN_CLUSTER_ROLE


def run(options: OperatorOptions) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or a lost leadership (exit 1)."""
    try:
        api_client = login()
    except KubeError as exc:
        log.error("%s", exc)
        return 2
    quiet_kopf_logs()
    return asyncio.run(_serve(options, api_client))


async def _serve(options: OperatorOptions, api_client: object) -> int:
    loop = asyncio.get_running_loop()
    identity = default_identity()
    kube = Kube(api_client)
    controller = Controller(kube, EventRecorder(kube, identity), options.status_interval, options.resync_interval,
                            options.idle_status_interval, options.mn_cluster_role)
    stopping, leading = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    kopf_task: asyncio.Task[None] | None = None

    def healthy() -> str | None:
        if kopf_task is not None and kopf_task.done() and not stopping.is_set():
            return "kopf stopped"
        if not controller.alive:
            return "the status thread stopped"
        return None

    runner = await http.start(options.http_bind, options.http_port, healthy)
    log.info("serving /healthz, /readyz and /metrics on %s:%d", options.http_bind, options.http_port)

    elector_stop = threading.Event()
    elector_thread = elector = None
    if options.leader_election:
        elector = LeaderElector(api_client, options.leader_election_namespace, options.leader_election_id,
                                identity, options.lease_duration, options.renew_deadline, options.retry_period)

        def stopped_leading() -> None:
            controller.halt()  # no new write from here on
            if not elector_stop.is_set():
                # A lost Lease: writes in flight in kopf's threads cannot be recalled, so end the
                # process now, before the standby may take over (renew deadline < lease duration).
                _exit_now("lost the leader Lease: exiting so that this replica starts again as a standby")

        elector_thread = threading.Thread(
            target=elector.run, name="leader-election",
            args=(lambda: loop.call_soon_threadsafe(leading.set), stopped_leading, elector_stop))
        elector_thread.start()
    else:
        leading.set()

    status = 0
    try:
        if await _first(leading, stopping) is leading:
            metrics.LEADER.set(1)
            controller.start()
            kopf_stop = asyncio.Event()
            # Our identity, given to kopf: its own default asks getpass.getuser(), which fails for the
            # image's user 65532 (no passwd entry), and it runs standalone, so it names nothing else.
            kopf_task = asyncio.create_task(kopf.operator(
                registry=build_registry(controller), standalone=True, clusterwide=not options.namespaces,
                namespaces=list(options.namespaces), stop_flag=kopf_stop, identity=identity))
            # kopf takes over SIGTERM/SIGINT while it runs: it then returns, which ends the wait too.
            await _first(stopping, kopf_task)  # kopf returns on SIGTERM/SIGINT, or raises if it failed
            kopf_stop.set()
            try:
                await asyncio.wait_for(kopf_task, KOPF_STOP_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("kopf did not stop within %.0fs", KOPF_STOP_TIMEOUT)
            except Exception as exc:
                log.error("kopf failed: %s", exc)
                status = 1
    finally:
        drained = await asyncio.to_thread(controller.stop, options.renew_deadline)
        metrics.LEADER.set(0)
        if elector is not None and not drained:
            # A write may still land; keep the Lease (a successor waits for it to expire) and end now.
            _exit_now("a write was still in flight after kopf stopped: exiting without releasing the Lease")
        elector_stop.set()  # releases the Lease only now: kopf and every write have stopped
        if elector_thread is not None:
            await asyncio.to_thread(elector_thread.join, options.renew_deadline + 5)
        await runner.cleanup()
    log.info("stopped")
    return status


async def _first(*waitables: asyncio.Event | asyncio.Task[None]) -> object:
    """Wait until one of the events is set or the task is done; return it."""
    tasks = {asyncio.ensure_future(w.wait()) if isinstance(w, asyncio.Event) else w: w for w in waitables}
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task not in done and not isinstance(tasks[task], asyncio.Task):
            task.cancel()
    return tasks[next(iter(done))]


def _exit_now(reason: str) -> None:
    """End the process at once, threads and writes in flight included; one line says why."""
    with contextlib.suppress(OSError):
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:23]  # logging's asctime
        os.write(2, f"{stamp} ERROR zstack_operator: {reason}\n".encode())
    os._exit(1)
