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
from zstack_devcluster.kubelet import runtime as kubelet_runtime
from zstack_devcluster.layout import Layout
from zstack_devcluster.pki import ensure_pki
from zstack_devcluster.ports import free_port, port_is_free
from zstack_devcluster.progress import Say, Ticker, stderr_say
from zstack_devcluster.state import ProcRecord, State, load, locked, save
from zstack_devcluster.tools import missing_tools

# Components are started phase by phase; a phase starts once the previous one is healthy. The node kinds:
# "process" (the process kubelet, started beside the controllers) and "containers" (containernode/).
NODE_KINDS = ("process", "containers")
PHASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "process": (("etcd",), ("kube-apiserver",), ("kube-controller-manager", "kube-scheduler", "kubelet")),
    "containers": (("etcd",), ("kube-apiserver",), ("kube-controller-manager", "kube-scheduler"),
                   container_node.RUNTIME, container_node.AGENTS, container_node.POLICY),
}
PHASE_TIMEOUT = {"etcd": 30.0, "kube-apiserver": 90.0, "kubelet": 60.0, "containerd": 30.0}
REQUIRED_TOOLS = {
    "process": ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"),
    "containers": ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet",
                   "kube-proxy", "coredns", "pause", "kube-router"),
}
_BY_NAME = {c.name: c for c in COMPONENTS}
_NODE_PROCESSES = ("kubelet", *container_node.RUNTIME, *container_node.AGENTS, *container_node.POLICY)
# Stop order and SIGTERM grace (seconds) per tier: the kubelet first, so it can stop its pods while the
# API still answers; etcd last.
STOP_TIERS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("kubelet",), 15.0),  # the kubelet gives its containers up to 8 s (--shutdown-grace), then SIGKILL
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
    """The control plane plus the node of the kind `st` records, by name in start order."""
    comps = {c.name: c for c in COMPONENTS if c.name != "kubelet"}
    if st.node == "containers" and st.node_index is not None:
        comps.update({c.name: c for c in container_node.components(lay, NodeNetwork(st.node_index))})
    else:
        comps["kubelet"] = _BY_NAME["kubelet"]
    return comps


def up(root: Path, say: Say = stderr_say, node: str | None = None) -> UpResult:
    """Start whatever is not running yet and wait until all of it is healthy. Idempotent.

    ``node`` picks the node kind; None keeps the one this directory ran last ("process" at first).
    """
    t0 = time.monotonic()
    lay = Layout(root)
    with locked(root):
        st = load(root)
        _choose_node(st, node or st.node)
        missing = [t for t in missing_tools() if t in REQUIRED_TOOLS[st.node]]
        if missing:
            raise DevclusterError(f"missing tool binaries: {', '.join(missing)}; run `zstack-dev tools` first")
        ensure_pki(lay.pki.root)
        ports = _allocate_ports(st)
        st.ports = ports
        _write_kubeconfigs(lay, ports)
        save(root, st)
        ctx = admin_context(lay.pki)
        comps_by_name = components(lay, st)
        started: list[str] = []
        try:
            for phase in PHASES[st.node]:
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


def _choose_node(st: State, kind: str) -> None:
    """Record the node kind (refusing to switch under a running node) and, for containers, its network."""
    if kind not in NODE_KINDS:
        raise DevclusterError(f"unknown node kind {kind!r}; use one of: {', '.join(NODE_KINDS)}")
    if kind != st.node and any(procs.record_alive(st.procs.get(n)) for n in _NODE_PROCESSES):
        raise DevclusterError(f"this devcluster runs a {st.node} node; run `zstack-dev down` first, "
                              f"then `zstack-dev up --node {kind}`")
    st.node = kind
    if kind == "containers" and st.node_index is None:  # kept until `down` gives the network back
        st.node_index = node_network.pick().index


def _release_idle_node(lay: Layout, st: State, say: Say) -> None:
    """After a failed `up`: when no process of the container node runs, give its network namespace, veth,
    cgroups, mounts and sysctls back, as `down` would (a failure partway left them until `down`)."""
    if st.node != "containers" or st.node_index is None:
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
    """Stop the named components tier by tier (STOP_TIERS), then any leftover pod processes.

    Clients go before the API server (it drains open connections before exiting) and etcd goes last.
    Process-kubelet pods run in their own sessions, so they are found by pid: the process trees snapshotted
    before stopping, and the kubelet's pidfiles (which also cover pods of a kubelet that crashed). Container
    pods are found by their cgroups, and their shims by the containerd they serve.

    Returns the names of the components that were running.
    """
    recs = {n: st.procs[n] for n in names if n in st.procs}
    live = {n: r for n, r in recs.items() if procs.record_alive(r)}
    orphans = [(p.pid, p.start_time) for p in procs.descendants(list(live.values()))]
    for tier, grace in STOP_TIERS:
        group = [live[n] for n in tier if n in live]
        if group:
            procs.stop_groups([(r.pid, r.start_time) for r in group], grace)
        if "kubelet" in tier and "kubelet" in recs:
            # Read after the kubelet stopped, so containers it started meanwhile are included.
            if st.node == "containers" and st.node_index is not None:
                container_node.kill_pods(lay, NodeNetwork(st.node_index))
            else:  # by session, so children whose container leader already exited are found too
                kubelet_runtime.kill_leftovers(lay.kubelet_root)
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
        if st.node == "containers" and st.node_index is not None:
            container_node.teardown(lay, NodeNetwork(st.node_index), st.sysctls, say)
            st.sysctls, st.node_index = {}, None
        save(root, st)
        say(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        if purge:
            for sub in ("etcd", "pki", "kubeconfigs", "kubelet", "logs", "apiserver", "node"):
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
    """Per component: recorded pid, whether it still runs, and whether its health check passes."""
    lay = Layout(root)
    st = load(root)
    ctx = admin_context(lay.pki) if lay.pki.client_crt("admin").exists() else None
    rows = []
    for comp in components(lay, st).values():
        rec: ProcRecord | None = st.procs.get(comp.name)
        running = procs.record_alive(rec)
        healthy = False
        if running and ctx is not None and all(p in st.ports for p in ("apiserver", *comp.ports)):
            healthy = comp.healthy(lay, st.ports, ctx)
        rows.append(
            ComponentStatus(
                name=comp.name, pid=rec.pid if rec else None, running=running, healthy=healthy,
                ports={p: st.ports[p] for p in comp.ports if p in st.ports}, log=lay.log(comp.name),
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
