"""Pinned Kubernetes tool binaries: build them once from the Go module proxy, then locate them.

The wrapper Go modules live next to this file in ``tools/<module>/go.mod``. Binaries are
cached in ``${XDG_CACHE_HOME:-~/.cache}/zstack-dev/<versions>/bin`` so a warm cache never runs ``go``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster.errors import DevclusterError

K8S_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.13"
HELM_VERSION = "v3.21.4"
KUBE_ROUTER_VERSION = "v2.1.0"  # as tools/kuberouter/go.mod requires it
VERSIONS = f"k8s-{K8S_VERSION}_etcd-{ETCD_VERSION}_helm-{HELM_VERSION}"

MODULES_DIR = Path(__file__).resolve().parent / "tools"

_K8S_MAJOR, _K8S_MINOR = K8S_VERSION.lstrip("v").split(".")[:2]
_K8S_LDFLAGS = " ".join(
    f"-X {pkg}.{key}={value}"
    for pkg, pairs in (
        (
            "k8s.io/component-base/version",
            (
                ("gitVersion", K8S_VERSION),
                ("gitMajor", _K8S_MAJOR),
                ("gitMinor", _K8S_MINOR),
                ("gitTreeState", "clean"),
                ("buildDate", "2026-01-01T00:00:00Z"),
            ),
        ),
        (
            "k8s.io/client-go/pkg/version",
            (
                ("gitVersion", K8S_VERSION),
                ("gitMajor", _K8S_MAJOR),
                ("gitMinor", _K8S_MINOR),
                ("gitTreeState", "clean"),
            ),
        ),
    )
    for key, value in pairs
)
_HELM_LDFLAGS = " ".join(
    [f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
    + [
        f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersion{part}={value}"
        for pkg in ("chartutil", "lint/rules")
        for part, value in (("Major", _K8S_MAJOR), ("Minor", _K8S_MINOR))
    ]
)


@dataclass(frozen=True)
class Tool:
    """One binary: the wrapper module that pins it, its Go package and extra ldflags."""

    name: str
    module: str
    package: str
    ldflags: str = ""
    static: bool = False  # CGO off: for a binary that runs alone in an image (the pause process)


TOOLS: tuple[Tool, ...] = (
    Tool("etcd", "etcd", "go.etcd.io/etcd/server/v3"),
    Tool("kube-apiserver", "k8s", "k8s.io/kubernetes/cmd/kube-apiserver", _K8S_LDFLAGS),
    Tool("kube-controller-manager", "k8s", "k8s.io/kubernetes/cmd/kube-controller-manager", _K8S_LDFLAGS),
    Tool("kube-scheduler", "k8s", "k8s.io/kubernetes/cmd/kube-scheduler", _K8S_LDFLAGS),
    Tool("kubectl", "k8s", "k8s.io/kubernetes/cmd/kubectl", _K8S_LDFLAGS),
    Tool("helm", "helm", "helm.sh/helm/v3/cmd/helm", _HELM_LDFLAGS),
    # The container node (zstack-dev up --node containers): kubelet and kube-proxy of the same release,
    # CoreDNS (its version pinned in tools/coredns/go.mod) and the pods' sandbox process.
    Tool("kubelet", "k8s", "k8s.io/kubernetes/cmd/kubelet", _K8S_LDFLAGS),
    Tool("kube-proxy", "k8s", "k8s.io/kubernetes/cmd/kube-proxy", _K8S_LDFLAGS),
    Tool("coredns", "coredns", "github.com/coredns/coredns"),
    Tool("pause", "pause", "zstack.dev/devcluster/tools/pause", static=True),
    # NetworkPolicy enforcement on the container node: kube-router's firewall controller alone.
    Tool("kube-router", "kuberouter", "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router",
         f"-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version={KUBE_ROUTER_VERSION}"),
)
TOOL_NAMES = tuple(t.name for t in TOOLS)


def cache_dir() -> Path:
    """The versioned cache directory (holds ``bin/`` and build logs)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zstack-dev" / VERSIONS


def bin_dir() -> Path:
    """Directory holding the pinned binaries."""
    return cache_dir() / "bin"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def tool_path(name: str) -> Path:
    """Path of a built tool, or a DevclusterError telling the user to build it."""
    if name not in TOOL_NAMES:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(TOOL_NAMES)}")
    path = bin_dir() / name
    if not _is_executable(path):
        raise DevclusterError(f"{name} is not built yet (looked for {path}); run `zstack-dev tools` first")
    return path


def missing_tools() -> list[str]:
    """Names of the tools not present in the cache."""
    return [t.name for t in TOOLS if not _is_executable(bin_dir() / t.name)]


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise DevclusterError(
            "`go` is not on PATH; install Go (1.26 or newer, e.g. /usr/local/go/bin) to build the "
            "pinned Kubernetes tools, then run `zstack-dev tools` again"
        )
    return go


def _build_one(go: str, tool: Tool, say: Callable[[str], None]) -> float:
    """Build one tool into a temporary name, then rename it into place. Returns seconds taken."""
    dest = bin_dir() / tool.name
    tmp = dest.with_name(f".{tool.name}.tmp{os.getpid()}")
    log_path = cache_dir() / "logs" / f"build-{tool.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod")
    if tool.static:
        env["CGO_ENABLED"] = "0"
    argv = [go, "build", "-trimpath", "-ldflags", f"-s -w {tool.ldflags}".strip(), "-o", str(tmp), tool.package]
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(
            argv, cwd=MODULES_DIR / tool.module, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            last = start
            while proc.poll() is None:
                time.sleep(1)
                now = time.monotonic()
                if now - last >= 30:
                    say(f"  ... still building {tool.name} ({now - start:.0f}s)")
                    last = now
        except BaseException:
            proc.kill()
            proc.wait()
            tmp.unlink(missing_ok=True)
            raise
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise DevclusterError(f"building {tool.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    os.replace(tmp, dest)
    return elapsed


def ensure_tools(say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Build every missing tool (never invoking ``go`` when all are present); return name -> path."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not missing_tools():
        return {t.name: bin_dir() / t.name for t in TOOLS}
    go = _go()
    absent = sorted({t.module for t in TOOLS} - {d.name for d in MODULES_DIR.glob("*") if (d / "go.mod").is_file()})
    if absent:
        raise DevclusterError(
            f"the wrapper Go modules {', '.join(absent)} are missing under {MODULES_DIR}; "
            "build from a source checkout (pip install -e .)"
        )
    bin_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another `zstack-dev tools` is building; waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        # Re-check under the lock: the other builder may have finished some tools.
        missing = [t for t in TOOLS if not _is_executable(bin_dir() / t.name)]
        if missing:
            say(f"building {len(missing)} tool(s) into {bin_dir()} (a cold build takes 20-50 min on 2 cores)")
        for i, tool in enumerate(missing, 1):
            say(f"[{i}/{len(missing)}] building {tool.name} from {tool.package} ...")
            elapsed = _build_one(go, tool, say)
            say(f"[{i}/{len(missing)}] {tool.name} built in {elapsed:.0f}s")
    return {t.name: bin_dir() / t.name for t in TOOLS}
