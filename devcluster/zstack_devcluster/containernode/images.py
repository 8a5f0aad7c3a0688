"""Images on the container node: imported from OCI archives, never pulled.

The pause image (the sandbox of every pod) is made here from the `pause` tool binary. The project's images
come from `zstack-dev images`; `load` imports every archive it finds, under the full names they carry
(`localhost/...`: containerd files a name without a registry under docker.io/library/).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

from zstack_devcluster import images as builds
from zstack_devcluster.containernode.config import PAUSE_IMAGE, NodeFiles
from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.progress import Say
from zstack_devcluster.tools import tool_path


def ctr(files: NodeFiles, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`ctr` on this node's containerd, in the CRI's namespace."""
    argv = ["ctr", "--address", str(files.containerd_socket), "--namespace", "k8s.io", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if proc.returncode != 0:
        raise DevclusterError(f"ctr {' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def pause_archive(say: Say) -> Path:
    """An OCI archive of PAUSE_IMAGE: the static `pause` binary alone, as user 65535. Cached by its digest."""
    binary = tool_path("pause")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:12]
    archive = builds.cache_dir() / "oci" / f"zstack-pause-{digest}.tar"
    if archive.exists():
        return archive
    say(f"making {PAUSE_IMAGE} from {binary}")
    archive.parent.mkdir(parents=True, exist_ok=True)
    container = builds.buildah("from", "scratch").stdout.strip()
    try:
        builds.buildah("copy", "--quiet", container, str(binary), "/pause")
        builds.buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container)
        builds.buildah("commit", "--quiet", container, PAUSE_IMAGE)
    finally:
        builds.buildah("rm", container)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    builds.buildah("push", "--quiet", PAUSE_IMAGE, f"oci-archive:{partial}:{PAUSE_IMAGE}")
    partial.rename(archive)
    return archive


def archive_images(archive: Path) -> dict[str, str]:
    """The images an OCI archive carries: name (its index's ref.name annotation) -> manifest digest."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        index = json.load(member) if member else {}
    return {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index.get("manifests", [])
            if "org.opencontainers.image.ref.name" in m.get("annotations", {})}


def present(files: NodeFiles) -> dict[str, str]:
    """The node's images: name -> manifest digest."""
    rows = ctr(files, "images", "list").stdout.splitlines()[1:]
    return {cols[0]: cols[2] for cols in (row.split() for row in rows) if len(cols) > 2}


def load(files: NodeFiles, archives: list[Path], say: Say) -> list[str]:
    """Import each archive whose images the node lacks or holds in another build; returns the names imported."""
    have = present(files)
    imported = []
    for archive in archives:
        carried = archive_images(archive)
        short = [n for n in carried if "/" not in n.split(":")[0]]
        if short:  # containerd would file it under docker.io/library/, where no pod looks for it
            raise DevclusterError(f"{archive} names {', '.join(short)} without a registry; "
                                  "run `zstack-dev images` again to rewrite it under localhost/")
        if carried and all(have.get(name) == digest for name, digest in carried.items()):
            continue
        say(f"  importing {', '.join(carried) or archive.name} into the node's containerd")
        ctr(files, "images", "import", "--all-platforms", str(archive))
        imported.extend(carried)
    return imported


def project_archives() -> list[Path]:
    """The archives `zstack-dev images` wrote (none before its first run)."""
    return [path for path in map(builds.archive_path, builds.IMAGES) if path.exists()]
