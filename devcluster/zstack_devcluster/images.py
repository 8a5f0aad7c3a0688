"""The project's images built here without Docker Hub: a Debian base from mmdebstrap, then the Dockerfile's
targets with buildah.

1. **Base.** `mmdebstrap` makes a bookworm root filesystem with Python (from this machine's apt sources) and
   buildah commits it as `localhost/zstack-python:bookworm`. It is made once; the package list names the tar.
2. **Targets.** `buildah bud --pull=never --layers --build-arg PYTHON_IMAGE=<base>` builds `node` and
   `operator` from the unchanged Dockerfile. A Docker user builds the same file on the public Python image.
   Cached layers make a rebuild after a code change cost only the project's own wheel.
3. **Export.** Each image is also written as an OCI archive, ready for `ctr images import`.

Everything lives under `${XDG_CACHE_HOME:-~/.cache}/zstack-dev/images`: buildah's own storage (vfs) and
run dir, never the system's. RUN steps use chroot isolation and the host's CA bundle, which pip needs to
reach the package index from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.progress import Say, stderr_say

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
BASE_IMAGE = f"localhost/zstack-python:{SUITE}"
TARGETS = ("node", "operator")
BASE_LABEL = "org.zstack.base-tar"  # which mmdebstrap tar a base image was imported from
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TOOLS = {"mmdebstrap": "mmdebstrap", "buildah": "buildah"}  # command -> Debian package


@dataclass(frozen=True)
class Built:
    """One built image: its name, OCI archive and how long its build took."""

    target: str
    name: str
    archive: Path
    seconds: float


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zstack-dev" / "images"


def version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def image_name(target: str) -> str:
    """`localhost/zstack-<target>:<version>`, the names the chart and the CRD default to, under localhost/."""
    return f"localhost/zstack-{target}:{version()}"


def buildah(*args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """buildah on the project's own storage; DevclusterError with its output (or log) when it fails."""
    root = cache_dir()
    argv = ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "vfs",
            *args]
    if log is None:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
    else:
        with log.open("w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        output = f"see {log}:\n" + "\n".join(log.read_text().splitlines()[-20:])
    if proc.returncode != 0:
        raise DevclusterError(f"buildah {' '.join(args[:2])} failed ({proc.returncode}): {output.strip()}")
    return proc


def build(say: Say = stderr_say) -> list[Built]:
    """Build the base (once) and both targets; return what was built, in TARGETS order."""
    _check_tools()
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ensure_base(say)
    built = []
    for target in TARGETS:
        name = image_name(target)
        say(f"building {name} (buildah bud --target {target}; log: {logs / f'bud-{target}.log'})")
        start = time.monotonic()
        buildah("bud", "--isolation", "chroot", "--pull=never", "--layers", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
                "--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro", "--target", target, "--tag", name,
                "--file", str(REPO / "Dockerfile"), str(REPO), log=logs / f"bud-{target}.log")
        archive = cache_dir() / "oci" / f"zstack-{target}-{version()}.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        buildah("push", "--quiet", name, f"oci-archive:{archive}:{name.removeprefix('localhost/')}")
        seconds = time.monotonic() - start
        say(f"  {name} in {seconds:.0f}s, archive {archive}")
        built.append(Built(target, name, archive, seconds))
    return built


def ensure_base(say: Say = stderr_say) -> None:
    """`BASE_IMAGE` from a cached mmdebstrap tar of BASE_PACKAGES (made when missing)."""
    tarball = cache_dir() / f"debian-{SUITE}-{_digest(BASE_PACKAGES)}.tar"
    if not tarball.exists():
        say(f"making the Debian {SUITE} base with mmdebstrap ({', '.join(BASE_PACKAGES)}); about a minute")
        partial = tarball.with_suffix(".partial")
        log = cache_dir() / "logs" / "mmdebstrap.log"
        with log.open("w") as out:
            proc = subprocess.run(["mmdebstrap", "--variant=apt", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                                   str(partial)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise DevclusterError(f"mmdebstrap failed ({proc.returncode}); see {log}: does apt reach this "
                                  "machine's Debian mirror (apt-get update)?")
        partial.rename(tarball)
    if _base_tar_of(BASE_IMAGE) == tarball.name:
        return
    say(f"importing {tarball.name} as {BASE_IMAGE}")
    container = buildah("from", "scratch").stdout.strip()
    try:
        buildah("add", "--quiet", container, str(tarball), "/")
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd", "python3", "--label", f"{BASE_LABEL}={tarball.name}", container)
        buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        buildah("rm", container)


def image_config(name: str) -> dict[str, Any]:
    """The OCI config of image `name` (User, Entrypoint, Labels, ...); DevclusterError when there is none."""
    return json.loads(buildah("inspect", "--type", "image", name).stdout)["OCIv1"]["config"]


def _base_tar_of(name: str) -> str | None:
    """The tar an imported base came from (its label), None when there is no such image."""
    try:
        labels = image_config(name).get("Labels") or {}
    except DevclusterError:
        return None
    return labels.get(BASE_LABEL)


def _digest(packages: tuple[str, ...]) -> str:
    return hashlib.sha256(" ".join(packages).encode()).hexdigest()[:12]


def _check_tools() -> None:
    missing = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if missing:
        raise DevclusterError(f"{', '.join(missing)} not installed: apt-get install {' '.join(missing)} "
                              "(make install does it)")
    if not HOST_CA_BUNDLE.exists():
        raise DevclusterError(f"{HOST_CA_BUNDLE} is missing: apt-get install ca-certificates")
