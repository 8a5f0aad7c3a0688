"""The private Prometheus's discovery helper (devcluster/services/prometheus.py) against the devcluster: it never
outlives its owner, and SIGTERM leaves none of the Kubernetes client's temporary key files behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.kube import KubeCluster
from tests.k8s.conftest import wait_for

pytestmark = pytest.mark.k8s


def start_helper(cluster: KubeCluster, workdir: Path, parent_pid: int) -> subprocess.Popen[bytes]:
    (workdir / "sd").mkdir()
    (workdir / "tmp").mkdir()
    argv = [sys.executable, "-c", "from zstack_devcluster.services.prometheus import discover; discover()",
            "--kubeconfig", str(cluster.kubeconfig), "--dir", str(workdir / "sd"), "--interval", "0.2",
            "--parent-pid", str(parent_pid)]
    helper = subprocess.Popen(argv, cwd=workdir, env=dict(os.environ, TMPDIR=str(workdir / "tmp")))
    wait_for("the helper's first pass", lambda: (workdir / "sd" / "zstack-mn.json").exists(), timeout=60)
    return helper


def test_the_helper_stops_once_its_owner_is_gone(devcluster: KubeCluster, tmp_path: Path) -> None:
    owner = subprocess.Popen(["sleep", "120"])
    helper = start_helper(devcluster, tmp_path, owner.pid)
    try:
        owner.kill()
        owner.wait()
        assert helper.wait(timeout=30) == 0
    finally:
        helper.kill()
        owner.kill()


def test_sigterm_removes_the_clients_temporary_key_files(devcluster: KubeCluster, tmp_path: Path) -> None:
    helper = start_helper(devcluster, tmp_path, os.getpid())
    assert list((tmp_path / "tmp").iterdir()), "the admin kubeconfig embeds its key: the client writes it to TMPDIR"
    helper.terminate()
    assert helper.wait(timeout=30) == 0
    assert not list((tmp_path / "tmp").iterdir()), "the cluster-admin key was left in TMPDIR"
