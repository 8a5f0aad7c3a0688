"""The devcluster control plane and its container node: a Ready node, garbage collection, idempotent up, env,
clean down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.kube import KubeCluster
from zstack_devcluster import controlplane, procs, tools
from zstack_devcluster import images as builds
from zstack_devcluster.layout import NODE_NAME
from zstack_devcluster.state import load

pytestmark = pytest.mark.k8s


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _recorded_pids(root: Path) -> dict[str, tuple[int, int]]:
    return {name: (rec.pid, rec.start_time) for name, rec in load(root).procs.items()}


def _mentions(pid: int, needle: bytes) -> bool:
    """Whether a process's command line or environment mentions ``needle``."""
    for part in ("cmdline", "environ"):
        try:
            if needle in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
        except OSError:
            continue
    return False


def _processes_of(root: Path) -> set[tuple[int, int]]:
    """(pid, start time) of every live process whose command line or environment names ``root``."""
    needle = str(root).encode()
    return {
        (p.pid, p.start_time)
        for p in procs.all_procs()
        if p.pid != os.getpid() and p.state not in ("Z", "X") and _mentions(p.pid, needle)
    }


def test_node_is_ready(devcluster: KubeCluster) -> None:
    from kubernetes import client

    core = client.CoreV1Api(devcluster.api_client())
    node = core.read_node(NODE_NAME)
    ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
    assert ready and ready[0].status == "True", node.status.conditions
    assert node.status.capacity and "cpu" in node.status.capacity
    out = devcluster.kubectl("get", "nodes", "--no-headers").stdout.split()
    assert out[:2] == [NODE_NAME, "Ready"], out


def test_owner_reference_garbage_collection(devcluster: KubeCluster) -> None:
    from kubernetes import client

    core = client.CoreV1Api(devcluster.api_client())
    ns = f"gc-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    try:
        parent = core.create_namespaced_config_map(ns, {"metadata": {"name": "parent"}, "data": {"a": "1"}})
        owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": parent.metadata.uid}
        for name in ("child-1", "child-2"):
            core.create_namespaced_config_map(ns, {"metadata": {"name": name, "ownerReferences": [owner]}})
        bystander = core.create_namespaced_config_map(ns, {"metadata": {"name": "bystander"}})
        core.delete_namespaced_config_map("parent", ns, propagation_policy="Background")

        def children_gone() -> bool:
            names = {cm.metadata.name for cm in core.list_namespaced_config_map(ns).items}
            return not names & {"child-1", "child-2"}

        wait_for("the garbage collector to delete the owned ConfigMaps", children_gone, timeout=90)
        assert core.read_namespaced_config_map("bystander", ns).metadata.uid == bystander.metadata.uid
    finally:
        core.delete_namespace(ns)


def test_up_is_idempotent(devcluster: KubeCluster) -> None:
    before = _recorded_pids(devcluster.root)
    assert set(before) >= {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"}
    t0 = time.monotonic()
    proc = devcluster.zstack_dev("up")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr, proc.stderr
    assert _recorded_pids(devcluster.root) == before
    assert all(procs.is_alive(pid, start) for pid, start in before.values())
    assert elapsed < 10, f"a no-op `up` took {elapsed:.1f}s"
    status = devcluster.zstack_dev("status")
    assert status.returncode == 0, status.stdout + status.stderr


def test_env_exports_work_for_kubectl(devcluster: KubeCluster) -> None:
    exports = devcluster.zstack_dev("env")
    assert exports.returncode == 0, exports.stderr
    assert f"export KUBECONFIG={devcluster.kubeconfig}" in exports.stdout
    # A shell with no KUBECONFIG and without the tools on PATH: only the exports make kubectl work.
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(tools.bin_dir()))
    script = exports.stdout + "\ncommand -v kubectl\nkubectl get nodes --no-headers\n"
    shell = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    lines = shell.stdout.splitlines()
    assert lines[0] == str(tools.bin_dir() / "kubectl")
    assert lines[1].split()[:2] == [NODE_NAME, "Ready"], shell.stdout


def test_tools_on_a_warm_cache_never_run_go(tmp_path: Path) -> None:
    """`zstack-dev tools` with every binary cached never runs `go`, and prints the paths."""
    # A `go` first on PATH that leaves a mark if anything runs it.
    fake_bin, mark = tmp_path / "bin", tmp_path / "go-ran"
    fake_bin.mkdir()
    (fake_bin / "go").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (fake_bin / "go").chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([str(fake_bin), os.environ["PATH"]]))
    proc = subprocess.run(
        [sys.executable, "-m", "zstack_devcluster.cli", "tools"], env=env, capture_output=True, text=True, timeout=30,
    )
    assert not mark.exists(), "a warm cache ran go"
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert printed == {name: str(tools.bin_dir() / name) for name in tools.TOOL_NAMES}
    assert "building" not in proc.stderr


SLEEPER = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "sleeper", "namespace": "default"},
    "spec": {
        "terminationGracePeriodSeconds": 2,
        "containers": [{"name": "main", "image": builds.image_name("node"), "imagePullPolicy": "Never",
                        "command": ["sleep", "3600"]}],
    },
}


@pytest.mark.slow
def test_down_leaves_no_process_behind(tmp_path: Path, images_built: object) -> None:
    """A cluster of its own (with a running pod): after `down`, none of its processes remain."""
    root = tmp_path / "dev"
    cluster = KubeCluster(root=root, started_here=True)
    assert _processes_of(root) == set()
    running: set[tuple[int, int]] = set()
    up = cluster.zstack_dev("up")
    try:
        assert up.returncode == 0, up.stderr
        recorded = _recorded_pids(root)
        assert set(recorded) == {row.name for row in controlplane.status(root)}, recorded
        assert len(recorded) == 10 and all(procs.is_alive(*p) for p in recorded.values())

        # A pod process too: `down` must not leave the kubelet's containers behind.
        def created() -> bool:  # retried: the `default` ServiceAccount appears shortly after start
            return cluster.kubectl("apply", "-f", "-", input=json.dumps(SLEEPER), check=False).returncode == 0

        wait_for("the sleeper pod to be accepted", created, timeout=60, interval=1)
        cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/sleeper", "--timeout=60s")
        pid = cluster.container_pid("default", "sleeper", "main")
        assert pid is not None and b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes()
        sleeper = procs.read_proc(pid)
        assert sleeper is not None

        running = _processes_of(root) | {(pid, sleeper.start_time)} | set(recorded.values())
        assert len(running) >= 11, running
    finally:
        down = cluster.zstack_dev("down")
    assert down.returncode == 0, down.stderr
    survivors = [p for p in running if procs.is_alive(*p)]
    assert survivors == [], f"processes left behind by `zstack-dev down`: {survivors}"
    assert _processes_of(root) == set()
    assert load(root).procs == {}
    assert cluster.zstack_dev("status").returncode == 1
