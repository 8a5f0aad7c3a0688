"""The project's images built here without Docker Hub: Debian bases from mmdebstrap, then the Dockerfiles
with buildah.

1. **Bases.** `mmdebstrap` makes bookworm root filesystems from this machine's apt sources and buildah
   commits them: `localhost/zstack-python:bookworm` (with Python) and `localhost/zstack-debian:bookworm`
   (minbase without docs, like the public debian:bookworm-slim). Each is made once; its options name its tar.
2. **Targets.** `buildah bud --pull=never --layers --build-arg PYTHON_IMAGE=<base>` builds `node` and
   `operator` from the unchanged Dockerfile. A Docker user builds the same file on the public Python image.
   Cached layers make a rebuild after a code change cost only the project's own wheel.
3. **Dependencies.** `images/rabbitmq` and `images/postgresql` build, on the Debian base, RabbitMQ and
   PostgreSQL from Debian's packages, meeting the contract the operator's managed ones rely on
   (docs/IMAGES.md). Their tags are the version their Dockerfile pins, which the build checks against the
   installed package: `localhost/zstack-rabbitmq:3.10.8-bookworm`, `localhost/zstack-postgresql:15-bookworm`.
4. **Export.** Each image is also written as an OCI archive, ready for `ctr images import`.
5. **Up to date.** An image whose inputs (its Dockerfile, the build context `.dockerignore` leaves in, the
   base it starts from, its build arguments) hash as when its archive was written is not built again.
   After a build, images no tagged image needs are removed (`prune`).

Everything lives under `${XDG_CACHE_HOME:-~/.cache}/zstack-dev/images`: buildah's own storage (vfs) and
run dir, never the system's. RUN steps use chroot isolation and the host's CA bundle, which pip needs to
reach the package index from here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.progress import Say, stderr_say

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
BASE_IMAGE = f"localhost/zstack-python:{SUITE}"
DEBIAN_IMAGE = f"localhost/zstack-debian:{SUITE}"
# What the public debian:<suite>-slim leaves out: docs (but their copyright), man pages, translations. They
# stay dpkg path-excludes in the image, so the packages a Dockerfile installs on it skip them too.
SLIM_EXCLUDES = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                 "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                 "path-exclude=/usr/share/groff/*", "path-exclude=/usr/share/lintian/*",
                 "path-exclude=/usr/share/locale/*")
# Merged /usr from the hook (as debootstrap does it), not from the usrmerge package, which would pull in perl.
DEBIAN_OPTIONS = ("--variant=minbase", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                  *(f"--dpkgopt={option}" for option in SLIM_EXCLUDES))
TARGETS = ("node", "operator")
# Dependency images (images/<name>/Dockerfile on DEBIAN_IMAGE) -> the ARG holding the version they pin.
DEPENDENCIES = {"rabbitmq": "RABBITMQ_VERSION", "postgresql": "PG_MAJOR"}
IMAGES = (*TARGETS, *DEPENDENCIES)
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
    """`localhost/zstack-<target>:<tag>`: the project's version for the Dockerfile's targets (the names the
    chart and the CRD default to, under localhost/), `<pinned version>-bookworm` for a dependency."""
    return f"localhost/zstack-{target}:{image_tag(target)}"


def image_tag(target: str) -> str:
    if target in DEPENDENCIES:
        return f"{pinned_version(target)}-{SUITE}"
    return version()


def dockerfile(target: str) -> Path:
    """The Dockerfile `target` is built from."""
    return REPO / "images" / target / "Dockerfile" if target in DEPENDENCIES else REPO / "Dockerfile"


def pinned_version(dependency: str) -> str:
    """The version a dependency's Dockerfile pins (the default of its version ARG)."""
    arg = DEPENDENCIES[dependency]
    match = re.search(rf"^ARG {arg}=(\S+)$", dockerfile(dependency).read_text(), re.M)
    if match is None:
        raise DevclusterError(f"{dockerfile(dependency)} has no `ARG {arg}=<version>` line")
    return match.group(1)


def buildah_argv(*args: str) -> list[str]:
    """The command line of buildah on the project's own storage (for a caller that runs it itself)."""
    root = cache_dir()
    return ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "vfs",
            *args]


def buildah(*args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """buildah on the project's own storage; DevclusterError with its output (or log) when it fails."""
    argv = buildah_argv(*args)
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


def build(say: Say = stderr_say, only: Iterable[str] | None = None, rebuild: bool = False) -> list[Built]:
    """Build the bases (once) and the images (`only` those named, else all) whose inputs changed, or every
    one with `rebuild`; return them in IMAGES order."""
    wanted = IMAGES if only is None else tuple(only)
    unknown = sorted(set(wanted) - set(IMAGES))
    if unknown:
        raise DevclusterError(f"no image named {', '.join(unknown)}: pick from {', '.join(IMAGES)}")
    _check_tools()
    (cache_dir() / "logs").mkdir(parents=True, exist_ok=True)
    if set(wanted) & set(TARGETS):
        ensure_base(say)
    if set(wanted) & set(DEPENDENCIES):
        ensure_debian(say)
    built = [_build_one(target, say, rebuild) for target in IMAGES if target in wanted]
    if any(image.seconds for image in built):
        removed = prune()
        if removed:
            say(f"removed {removed} images no tagged image needs (earlier builds and their layer cache)")
    return built


def prune() -> int:
    """Remove every untagged image that is not the layer cache of a tagged one; returns how many.

    vfs stores each layer as a full copy of the tree, so each rebuild would otherwise leave gigabytes
    behind. An untagged image whose layers begin some tagged image's is the cache of a step that image
    reuses (the dependencies' layer, above all), and stays. One still used by a working container stays too.
    """
    rows = json.loads(buildah("images", "--all", "--json").stdout) or []
    chains = {row["id"]: _layers(row["id"]) for row in rows}
    tagged = [chains[row["id"]] for row in rows if row.get("names")]
    removed = 0
    for row in rows:
        chain = chains[row["id"]]
        if row.get("names") or any(whole[:len(chain)] == chain for whole in tagged):
            continue
        try:
            buildah("rmi", row["id"])
        except DevclusterError:
            continue  # in use, or already gone with another
        removed += 1
    return removed


def _layers(image_id: str) -> list[str]:
    """The image's layers (diff IDs), base first."""
    return json.loads(buildah("inspect", "--type", "image", image_id).stdout)["OCIv1"]["rootfs"].get("diff_ids") or []


def _build_one(target: str, say: Say, rebuild: bool) -> Built:
    """`buildah bud` of one image, then its OCI archive; nothing when both are up to date."""
    name, log = image_name(target), cache_dir() / "logs" / f"bud-{target}.log"
    archive = archive_path(target)
    stamp = archive.with_name(f"{archive.name}.inputs")  # the inputs' fingerprint the archive was built from
    fingerprint = inputs_fingerprint(target)
    if not rebuild and archive.exists() and stamp.exists() and stamp.read_text() == fingerprint and _exists(name):
        say(f"{name} is up to date (its inputs are unchanged; `zstack-dev images --rebuild` builds it anyway)")
        return Built(target, name, archive, 0.0)
    say(f"building {name} (buildah bud {_describe(target)}; log: {log})")
    start = time.monotonic()
    if target in DEPENDENCIES:
        context = dockerfile(target).parent
        args = ["--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}"]
    else:
        context = REPO
        args = ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
                "--target", target]
    buildah("bud", "--isolation", "chroot", "--pull=never", "--layers", *args, "--tag", name,
            "--file", str(dockerfile(target)), str(context), log=log)
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)
    buildah("push", "--quiet", name, f"oci-archive:{archive}:{name}")
    stamp.write_text(fingerprint)
    seconds = time.monotonic() - start
    say(f"  {name} in {seconds:.0f}s, archive {archive}")
    return Built(target, name, archive, seconds)


def archive_path(target: str) -> Path:
    """Where the OCI archive of `target` is written."""
    return cache_dir() / "oci" / f"zstack-{target}-{image_tag(target)}.tar"


def inputs_fingerprint(target: str) -> str:
    """sha256 over what a build of `target` reads: its base (by the tar it came from), build arguments,
    Dockerfile and every file of its context that `.dockerignore` leaves in (name, mode and content)."""
    base = DEBIAN_IMAGE if target in DEPENDENCIES else BASE_IMAGE
    context = dockerfile(target).parent if target in DEPENDENCIES else REPO
    digest = hashlib.sha256(f"{target}\0{base}\0{_base_tar_of(base)}\0{image_name(target)}\0".encode())
    for path in [dockerfile(target), *context_files(context)]:
        digest.update(f"{path.relative_to(REPO)}\0{path.stat().st_mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def context_files(context: Path) -> list[Path]:
    """The files of a build context, minus what its `.dockerignore` names. Its patterns are matched as
    globs against each path and, for `**/` ones, at any depth; a file with `!` exceptions is not read
    (every file counts), so a change is never missed: at worst an image is built once too often."""
    ignore_file = context / ".dockerignore"
    lines = ignore_file.read_text().splitlines() if ignore_file.exists() else []
    patterns = [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]
    if any(pattern.startswith("!") for pattern in patterns):
        patterns = []

    def ignored(relative: str) -> bool:
        return any(fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, pattern.removeprefix("**/"))
                   for pattern in patterns)

    found = []
    for dirpath, dirnames, filenames in os.walk(context):
        here = os.path.relpath(dirpath, context)
        dirnames[:] = sorted(d for d in dirnames if not ignored(os.path.normpath(os.path.join(here, d))))
        found += [Path(dirpath, f) for f in sorted(filenames) if not ignored(os.path.normpath(os.path.join(here, f)))]
    return found


def _exists(name: str) -> bool:
    try:
        image_config(name)
    except DevclusterError:
        return False
    return True


def _describe(target: str) -> str:
    if target in DEPENDENCIES:
        return f"{dockerfile(target).relative_to(REPO)} on {DEBIAN_IMAGE}"
    return f"--target {target}"


def ensure_base(say: Say = stderr_say) -> None:
    """`BASE_IMAGE` from a cached mmdebstrap tar of BASE_PACKAGES (made when missing)."""
    _ensure_rootfs(BASE_IMAGE, f"debian-{SUITE}-{_digest(BASE_PACKAGES)}.tar",
                   ("--variant=apt", f"--include={','.join(BASE_PACKAGES)}"), "python3",
                   f"with {', '.join(BASE_PACKAGES)}", say)


def ensure_debian(say: Say = stderr_say) -> None:
    """`DEBIAN_IMAGE`, a plain minbase without docs, from a cached mmdebstrap tar (made when missing)."""
    _ensure_rootfs(DEBIAN_IMAGE, f"debian-{SUITE}-minbase-{_digest(DEBIAN_OPTIONS)}.tar", DEBIAN_OPTIONS, "bash",
                   "minbase, slim", say)


def _ensure_rootfs(image: str, tar_name: str, options: tuple[str, ...], cmd: str, what: str, say: Say) -> None:
    """`image` from the mmdebstrap tar `tar_name` of `options` (made once), imported when the image is missing
    or came from another tar."""
    tarball = cache_dir() / tar_name
    if not tarball.exists():
        say(f"making the Debian {SUITE} base with mmdebstrap ({what}); about a minute")
        partial = tarball.with_suffix(".partial")
        log = cache_dir() / "logs" / f"mmdebstrap-{image.rsplit('/', 1)[-1].replace(':', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.run(["mmdebstrap", "--format=tar", *options, SUITE, str(partial)], stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise DevclusterError(f"mmdebstrap failed ({proc.returncode}); see {log}: does apt reach this "
                                  "machine's Debian mirror (apt-get update)?")
        partial.rename(tarball)
    if _base_tar_of(image) == tarball.name:
        return
    say(f"importing {tarball.name} as {image}")
    container = buildah("from", "scratch").stdout.strip()
    try:
        buildah("add", "--quiet", container, str(tarball), "/")
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd", cmd, "--label", f"{BASE_LABEL}={tarball.name}", container)
        buildah("commit", "--quiet", container, image)
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


def _digest(words: tuple[str, ...]) -> str:
    return hashlib.sha256(" ".join(words).encode()).hexdigest()[:12]


def _check_tools() -> None:
    missing = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if missing:
        raise DevclusterError(f"{', '.join(missing)} not installed: apt-get install {' '.join(missing)} "
                              "(make install does it)")
    if not HOST_CA_BUNDLE.exists():
        raise DevclusterError(f"{HOST_CA_BUNDLE} is missing: apt-get install ca-certificates")
