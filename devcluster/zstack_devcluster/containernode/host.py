"""What the container node changes on the host, and how `down` gives it back.

- **cgroups:** the kubelet's cgroupRoot, made in every hierarchy before it starts (cgroup v1 wants the
  cpuset of a new group filled in), and removed, deepest group first, once no process is left in it.
- **sysctls:** the kubelet sets a few global ones (it cannot leave them, and they are not per network
  namespace). `up` records what it found before the first kubelet start; `down` writes those values back.
- **mounts:** the kubelet's volumes, containerd's root filesystems and the pods' network namespaces are all
  mounted under the devcluster directory; `down` unmounts whatever is left there.
- **processes:** pods outlive the kubelet and containerd (their shims keep them), so `down` kills every
  process in the node's cgroups and every shim of its containerd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.procs import all_procs

CGROUP_FS = Path("/sys/fs/cgroup")
# What the kubelet writes when it starts (pkg/kubelet/cm: setupKernelTunables), as /proc/sys paths.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")


def hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, named ones, and the unified v2 one)."""
    out = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            _, target, fstype, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                out.append(Path(target))
    return out


def make_cgroup_root(name: str) -> None:
    """`/<name>` in every hierarchy; cpuset groups copy their parent's cpus and mems (empty ones refuse tasks)."""
    for hierarchy in hierarchies():
        group = hierarchy / name
        group.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (group / knob).exists() and not (group / knob).read_text().strip():
                (group / knob).write_text((hierarchy / knob).read_text())


def cgroup_pids(name: str) -> set[int]:
    """Every pid in `/<name>` or below, in any hierarchy."""
    pids: set[int] = set()
    for hierarchy in hierarchies():
        for procs in (hierarchy / name).rglob("cgroup.procs") if (hierarchy / name).is_dir() else ():
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def remove_cgroup_root(name: str) -> list[Path]:
    """rmdir `/<name>` and its children in every hierarchy, deepest first; returns the groups that stay."""
    left = []
    for hierarchy in hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        for group in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                group.rmdir()
            except OSError:
                left.append(group)
    return left


def read_sysctls() -> dict[str, str]:
    return {key: (Path("/proc/sys") / key).read_text().strip() for key in KUBELET_SYSCTLS
            if (Path("/proc/sys") / key).exists()}


def restore_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)


def kill_pids(pids: set[int], what: str, timeout: float = 10.0) -> None:
    """SIGKILL `pids` until none is left (a pod's processes may still fork while we kill)."""
    deadline = time.monotonic() + timeout
    while pids:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise DevclusterError(f"{what}: pids {sorted(pids)} survive SIGKILL (stuck in the kernel?); "
                                  "look at /proc/<pid>/stack, then run `zstack-dev down` again")
        time.sleep(0.05)
        pids = {p.pid for p in all_procs() if p.pid in pids and p.state not in ("Z", "X")}


def shims_of(containerd_socket: Path) -> set[int]:
    """The containerd-shim processes serving the containerd at `containerd_socket`."""
    out = set()
    for proc in all_procs():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"containerd-shim-runc-v2") and str(containerd_socket).encode() in argv:
                out.add(proc.pid)
    return out


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    prefix = str(root.resolve())
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: -p.count("/"))


def unmount_all(root: Path) -> list[str]:
    """Unmount everything below `root` (lazily when busy); returns what is still mounted."""
    for point in mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True, stdin=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, stdin=subprocess.DEVNULL)
    return mounts_under(root)


# The kubelet also links every container's log here, a path no setting moves; it removes a link with its
# container, which a node taken down by `down` never gets to.
LEGACY_LOG_LINKS = Path("/var/log/containers")


def remove_log_links(pod_logs: Path) -> None:
    """Remove the links in LEGACY_LOG_LINKS that point into this node's `pod_logs`."""
    for link in LEGACY_LOG_LINKS.iterdir() if LEGACY_LOG_LINKS.is_dir() else ():
        if link.is_symlink() and Path(os.readlink(link)).is_relative_to(pod_logs):
            link.unlink(missing_ok=True)
