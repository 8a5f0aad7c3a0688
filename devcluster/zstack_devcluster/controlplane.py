"""Bring the devcluster up, take it down, and report on it. Processes are tracked in ``DIR/state.json``."""

from __future__ import annotations

import contextlib
import shutil
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster import procs
from zstack_devcluster.components import COMPONENTS, Component, Ports
from zstack_devcluster.containernode import network as node_network
from zstack_devcluster.containernode import node as container_node
from zstack_devcluster.containernode.network import NodeNetwork
from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.health import admin_context
from zstack_devcluster.kubeconfig import write_kubeconfig
from zstack_devcluster.layout import Layout
from zstack_devcluster.pki import ensure_pki
from zstack_devcluster.ports import free_port, port_is_free
from zstack_devcluster.progress import Say, Ticker, stderr_say
from zstack_devcluster.state import ProcRecord, State, load, locked, save
from zstack_devcluster.tools import missing_tools

# The one node kind (`zstack-dev up --node containers`): containerd, runc and a real kubelet (containernode/).
NODE_KIND = "containers"
# Components are started phase by phase; a phase starts once the previous one is healthy.
PHASES: tuple[tuple[str, ...], ...] = (
    ("etcd",), ("kube-apiserver",), ("kube-controller-manager", "kube-scheduler"),
    container_node.RUNTIME, container_node.AGENTS, container_node.POLICY,
)
PHASE_TIMEOUT = {"etcd": 30.0, "kube-apiserver": 90.0, "kubelet": 60.0, "containerd": 30.0}
REQUIRED_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet",
                  "kube-proxy", "coredns", "pause", "kube-router")
_NODE_PROCESSES = (*container_node.RUNTIME, *container_node.AGENTS, *container_node.POLICY)
# Stop order and SIGTERM grace (seconds) per tier: the kubelet first, so it starts no pod while the rest
# stops (its pods are killed by cgroup right after it); etcd last.
STOP_TIERS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("kubelet",), 15.0),
    (("kube-proxy", "coredns", "network-policy", "containerd", "apiserver-bridge"), 5.0),
    (("kube-scheduler", "kube-controller-manager"), 5.0),
    (("kube-apiserver",), 10.0),
    (("etcd",), 5.0),
)


def _tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def _allocate_ports(st: State) -> Ports:
    """Keep each recorded port while its owner runs or it is still free; otherwise pick a new one."""
    ports: Ports = {}
    for comp in COMPONENTS:
        owner_alive = procs.record_alive(st.procs.get(comp.name))
        for name in comp.ports:
            old = st.ports.get(name)
            keep = old is not None and (owner_alive or port_is_free(old))
            ports[name] = old if keep else free_port()
    return ports


def _write_kubeconfigs(lay: Layout, ports: Ports) -> None:
    pki, server = lay.pki, f"https://127.0.0.1:{ports['apiserver']}"
    write_kubeconfig(lay.kubeconfig, server, pki.ca_crt, pki.client_crt("admin"), pki.client_key("admin"), "admin")
    for client in ("controller-manager", "scheduler"):
        write_kubeconfig(
            lay.component_kubeconfig(client), server, pki.ca_crt,
            pki.client_crt(client), pki.client_key(client), client,
        )


def _wait_healthy(
    lay: Layout, ports: Ports, ctx: ssl.SSLContext, comps: list[Component], st: State, timeout: float, say: Say
) -> None:
    """Wait until every component in ``comps`` is healthy; fail fast when one of them exits."""
    ticker = Ticker(say)
    pending = list(comps)
    while pending:
        for comp in list(pending):
            rec = st.procs[comp.name]
            if comp.healthy(lay, ports, ctx):
                pending.remove(comp)
                ticker.done(f"  {comp.name} ready: {comp.what} ok ({ticker.elapsed():.1f}s)")
            elif not procs.record_alive(rec):
                raise DevclusterError(
                    f"{comp.name} (pid {rec.pid}) exited during startup. Last lines of {rec.log}:\n"
                    f"{_tail(rec.log)}\nFix the cause, then run `zstack-dev up` again."
                )
        if not pending:
            break
        if ticker.elapsed() > timeout:
            names = ", ".join(f"{c.name} ({c.what})" for c in pending)
            logs = "\n".join(f"  {c.name}: {st.procs[c.name].log}\n{_tail(st.procs[c.name].log, 8)}" for c in pending)
            raise DevclusterError(f"timed out after {timeout:.0f}s waiting for {names}.\n{logs}")
        ticker.tick(", ".join(c.name for c in pending))
        time.sleep(0.2)


@dataclass
class UpResult:
    """What ``up`` did: the kubeconfig, the components it (re)started, and the time it took."""

    kubeconfig: Path
    started: list[str]
    seconds: float


def components(lay: Layout, st: State) -> dict[str, Component]:
    """The control plane plus, once `up` gave it a network, the container node; by name in start order."""
    comps = {c.name: c for c in COMPONENTS}
    if st.node_index is not None:
        comps.update({c.name: c for c in container_node.components(lay, NodeNetwork(st.node_index))})
    return comps


def up(root: Path, say: Say = stderr_say, node: str | None = None) -> UpResult:
    """Start whatever is not running yet and wait until all of it is healthy. Idempotent.

    ``node`` names the node kind: "containers", the only one (None means the same).
    """
    if node not in (None, NODE_KIND):
        raise DevclusterError(f"unknown node kind {node!r}: the only one is {NODE_KIND!r}")
    t0 = time.monotonic()
    lay = Layout(root)
    with locked(root):
        missing = [t for t in missing_tools() if t in REQUIRED_TOOLS]
        if missing:
            raise DevclusterError(f"missing tool binaries: {', '.join(missing)}; run `zstack-dev tools` first")
        st = load(root)
        _choose_node(st)
        save(root, st)  # the claimed network is this directory's from now on: `down` gives it back
        ensure_pki(lay.pki.root)
        ports = _allocate_ports(st)
        st.ports = ports
        _write_kubeconfigs(lay, ports)
        save(root, st)
        ctx = admin_context(lay.pki)
        comps_by_name = components(lay, st)
        started: list[str] = []
        try:
            for phase in PHASES:
                if phase == container_node.RUNTIME:
                    assert st.node_index is not None
                    st.sysctls = container_node.prepare(lay, NodeNetwork(st.node_index), ports, st.sysctls, say)
                    save(root, st)
                if phase == container_node.AGENTS:
                    assert st.node_index is not None
                    container_node.publish(lay, NodeNetwork(st.node_index), ports, say)
                comps = [comps_by_name[n] for n in phase]
                for comp in comps:
                    _ensure_running(lay, ports, comp, st, started, say)
                save(root, st)
                timeout = max(PHASE_TIMEOUT.get(c.name, 30.0) for c in comps)
                _wait_healthy(lay, ports, ctx, comps, st, timeout, say)
        except BaseException:
            if started:
                say(f"startup failed; stopping what this run started: {', '.join(started)}")
                _stop(lay, st, [n for n in reversed(list(st.procs)) if n in started], say)
            _release_idle_node(lay, st, say)
            save(root, st)
            raise
    return UpResult(lay.kubeconfig, started, time.monotonic() - t0)


def _choose_node(st: State) -> None:
    """Record the container node and claim its network (kept until `down` gives it back). The node of
    another kind that a state.json of an older checkout may record is refused while it runs."""
    if st.node != NODE_KIND and any(procs.record_alive(st.procs.get(n)) for n in _NODE_PROCESSES):
        raise DevclusterError(f"this devcluster runs a {st.node!r} node of an older checkout: run `zstack-dev down` "
                              "first, then `zstack-dev up`")
    st.node = NODE_KIND
    if st.node_index is None:
        st.node_index = node_network.claim().index


def _release_idle_node(lay: Layout, st: State, say: Say) -> None:
    """After a failed `up`: when no process of the container node runs, give its network namespace, veth,
    cgroups, mounts and sysctls back, as `down` would (a failure partway left them until `down`)."""
    if st.node_index is None:
        return
    if any(procs.record_alive(st.procs.get(n)) for n in _NODE_PROCESSES):
        return
    say("  giving the node's network, cgroups and sysctls back")
    container_node.teardown(lay, NodeNetwork(st.node_index), st.sysctls, say)
    st.sysctls, st.node_index = {}, None


def _ensure_running(lay: Layout, ports: Ports, comp: Component, st: State, started: list[str], say: Say) -> None:
    """Start ``comp`` unless it already runs with exactly the wanted command line."""
    argv = comp.argv(lay, ports)
    rec = st.procs.get(comp.name)
    if procs.record_alive(rec):
        assert rec is not None
        if rec.argv == argv:
            return
        say(f"  {comp.name}: configuration changed, restarting pid {rec.pid}")
        _stop(lay, st, [comp.name], say)
    if comp.name == "etcd":
        lay.etcd_data.mkdir(parents=True, exist_ok=True)
        lay.etcd_data.chmod(0o700)
    rec = procs.spawn(argv, lay.log(comp.name))
    st.procs[comp.name] = rec
    started.append(comp.name)
    listen = ", ".join(f"{p}={ports[p]}" for p in comp.ports)
    say(f"  started {comp.name} pid {rec.pid}" + (f" ({listen})" if listen else ""))


def _stop(lay: Layout, st: State, names: list[str], say: Say) -> list[str]:
    """Stop the named components tier by tier (STOP_TIERS), then any leftover processes they started.

    Clients go before the API server (it drains open connections before exiting) and etcd goes last.
    Pods are found by their cgroups, and their shims by the containerd they serve; any other process the
    components started, by the process trees snapshotted before stopping.

    Returns the names of the components that were running.
    """
    recs = {n: st.procs[n] for n in names if n in st.procs}
    live = {n: r for n, r in recs.items() if procs.record_alive(r)}
    orphans = [(p.pid, p.start_time) for p in procs.descendants(list(live.values()))]
    for tier, grace in STOP_TIERS:
        group = [live[n] for n in tier if n in live]
        if group:
            procs.stop_groups([(r.pid, r.start_time) for r in group], grace)
        if "kubelet" in tier and "kubelet" in recs and st.node_index is not None:
            # After the kubelet stopped, so containers it started meanwhile are included.
            container_node.kill_pods(lay, NodeNetwork(st.node_index))
    leftover = set()
    for pid, start in orphans:
        info = procs.read_proc(pid)
        if info is not None and info.start_time == start and info.state not in ("Z", "X"):
            leftover.add((info.pgid, start))
    if leftover:
        say(f"  stopping {len(leftover)} leftover process group(s) of pods")
        procs.stop_groups(sorted(leftover), 2.0)
    for n in recs:
        st.procs.pop(n, None)
    return [n for n in names if n in live]


def down(root: Path, say: Say = stderr_say, purge: bool = False) -> list[str]:
    """Stop everything ``up`` started in ``root`` (by pid); with ``purge`` also delete its files."""
    lay = Layout(root)
    if not (root / "state.json").exists():
        say(f"nothing to stop: no devcluster state in {root}")
        return []
    with locked(root):
        st = load(root)
        stopped = _stop(lay, st, [n for tier, _ in STOP_TIERS for n in tier], say)
        if st.node_index is not None:
            container_node.teardown(lay, NodeNetwork(st.node_index), st.sysctls, say)
            st.sysctls, st.node_index = {}, None
        save(root, st)
        say(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        if purge:
            for sub in ("etcd", "pki", "kubeconfigs", "logs", "apiserver", "node"):
                shutil.rmtree(root / sub, ignore_errors=True)
            for f in (lay.kubeconfig, root / "state.json"):
                f.unlink(missing_ok=True)
            say(f"purged devcluster files in {root}")
    if purge:
        with contextlib.suppress(FileNotFoundError):
            (root / ".lock").unlink()
    return stopped


@dataclass
class ComponentStatus:
    """One row of ``zstack-dev status``."""

    name: str
    pid: int | None
    running: bool
    healthy: bool
    ports: dict[str, int]
    log: Path


def status(root: Path) -> list[ComponentStatus]:
    """Per component: recorded pid, whether it still runs, and whether its health check passes. The node's
    processes are listed, never healthy, before `up` gave the node a network."""
    lay = Layout(root)
    st = load(root)
    ctx = admin_context(lay.pki) if lay.pki.client_crt("admin").exists() else None
    comps = components(lay, st)
    rows = []
    for name in [*comps, *(n for n in _NODE_PROCESSES if n not in comps)]:
        comp = comps.get(name)
        rec: ProcRecord | None = st.procs.get(name)
        running = procs.record_alive(rec)
        healthy = False
        if comp and running and ctx is not None and all(p in st.ports for p in ("apiserver", *comp.ports)):
            healthy = comp.healthy(lay, st.ports, ctx)
        rows.append(
            ComponentStatus(
                name=name, pid=rec.pid if rec else None, running=running, healthy=healthy,
                ports={p: st.ports[p] for p in (comp.ports if comp else ()) if p in st.ports}, log=lay.log(name),
            )
        )
    return rows


def is_up(root: Path) -> bool:
    """True when every component runs and is healthy."""
    return all(r.running and r.healthy for r in status(root))


def stop_components(root: Path, names: list[str], say: Say = stderr_say) -> list[str]:
    """Stop only the named components (say, kube-apiserver for an outage test); ``up`` starts them again.

    Returns the names that were running. Pods keep running unless the kubelet is among ``names``.
    """
    with locked(root):
        st = load(root)
        known = components(Layout(root), st)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DevclusterError(f"unknown component(s): {', '.join(unknown)}; known: {', '.join(known)}")
        stopped = _stop(Layout(root), st, names, say)
        save(root, st)
    return stopped
