"""Volumes as plain directories, and volumeMounts as symlinks in a container root.

A process cannot get a private /etc, so every container gets a root directory
(exported as POD_ROOT and ZSTACK_POD_ROOT). A volumeMount with mountPath
/etc/app becomes the symlink <POD_ROOT>/etc/app pointing at the volume's
directory (or at <volume>/<subPath>). Programs that honour ZSTACK_POD_ROOT find
their files there; others get the absolute paths through $(POD_ROOT) in args.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zstack_devcluster.kubelet.envvars import ConfigError, expand, field_value, resource_value
from zstack_devcluster.kubelet.paths import PodPaths

log = logging.getLogger(__name__)

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

# lookup(kind, namespace, name) -> the object's raw JSON, or None when it is missing.
ObjectLookup = Callable[[str, str, str], "dict[str, Any] | None"]
# token(audience, expirationSeconds) -> a bound ServiceAccount token for the pod.
TokenSource = Callable[[str, int], str]

SUPPORTED = ("configMap", "secret", "emptyDir", "downwardAPI", "projected", "hostPath", "persistentVolumeClaim")


class VolumeError(Exception):
    """A volume cannot be set up (yet): the pod stays in ContainerCreating."""


def volume_kind(vol: dict[str, Any]) -> str:
    """The source type of a pod volume, e.g. 'configMap'."""
    return next((k for k in vol if k != "name"), "emptyDir")


def unsupported(pod: dict[str, Any]) -> list[str]:
    """Names of volumes whose type this kubelet does not emulate."""
    return [
        f"{v['name']} ({volume_kind(v)})"
        for v in pod["spec"].get("volumes") or []
        if volume_kind(v) not in SUPPORTED
    ]


def volume_dir(root: Path, paths: PodPaths, pod: dict[str, Any], vol: dict[str, Any]) -> Path:
    """Where a volume's files live on the host."""
    kind = volume_kind(vol)
    if kind == "hostPath":
        return Path(vol["hostPath"]["path"])
    if kind == "persistentVolumeClaim":
        ns = pod["metadata"]["namespace"]
        return root / "pvc" / f"{ns}_{vol['persistentVolumeClaim']['claimName']}"
    return paths.volume(vol["name"])


def setup_volumes(
    root: Path,
    paths: PodPaths,
    pod: dict[str, Any],
    pod_ip: str,
    lookup: ObjectLookup,
    token: TokenSource,
) -> None:
    """Create or refresh every volume of the pod; raise VolumeError when one cannot be made."""
    bad = unsupported(pod)
    if bad:
        raise VolumeError(f"volume type not supported by the process kubelet: {', '.join(bad)}")
    for vol in pod["spec"].get("volumes") or []:
        kind = volume_kind(vol)
        target = volume_dir(root, paths, pod, vol)
        if kind == "emptyDir" or kind == "persistentVolumeClaim":
            target.mkdir(parents=True, exist_ok=True)
        elif kind == "hostPath":
            _host_path(vol["hostPath"])
        else:
            files = _volume_files(pod, vol, pod_ip, lookup, token)
            if files is not None:
                sync_dir(target, files)
            else:
                target.mkdir(parents=True, exist_ok=True)


def _host_path(hp: dict[str, Any]) -> None:
    path, kind = Path(hp["path"]), hp.get("type", "")
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate" and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    elif kind in ("Directory", "File", "Socket", "CharDevice", "BlockDevice") and not path.exists():
        raise VolumeError(f"hostPath {path} does not exist (type {kind})")


Files = dict[str, tuple[bytes, int]]


def _volume_files(
    pod: dict[str, Any], vol: dict[str, Any], pod_ip: str, lookup: ObjectLookup, token: TokenSource
) -> Files | None:
    kind = volume_kind(vol)
    src = vol[kind] or {}
    mode = src.get("defaultMode", 0o644)
    secret_mode = src.get("defaultMode", 0o600)  # secrets and tokens: owner only unless the pod says otherwise
    ns = pod["metadata"]["namespace"]
    if kind == "configMap":
        return _object_files("configmap", ns, src.get("name", ""), src, mode, lookup)
    if kind == "secret":
        return _object_files("secret", ns, src.get("secretName", ""), src, secret_mode, lookup)
    if kind == "downwardAPI":
        return _downward_files(pod, src.get("items") or [], mode, pod_ip)
    if kind == "projected":
        files: Files = {}
        for s in src.get("sources") or []:
            if "configMap" in s:
                got = _object_files("configmap", ns, s["configMap"].get("name", ""), s["configMap"], mode, lookup)
            elif "secret" in s:
                got = _object_files("secret", ns, s["secret"].get("name", ""), s["secret"], secret_mode, lookup)
            elif "downwardAPI" in s:
                got = _downward_files(pod, s["downwardAPI"].get("items") or [], mode, pod_ip)
            elif "serviceAccountToken" in s:
                t = s["serviceAccountToken"]
                tok = token(t.get("audience", ""), int(t.get("expirationSeconds", 3600)))
                got = {t["path"]: (tok.encode(), secret_mode)}
            else:
                raise VolumeError(f"projected source {sorted(s)} not supported by the process kubelet")
            files.update(got or {})
        return files
    return None


def _object_files(
    kind: str, ns: str, name: str, src: dict[str, Any], mode: int, lookup: ObjectLookup
) -> Files:
    obj = lookup(kind, ns, name)
    if obj is None:
        if src.get("optional"):
            return {}
        raise VolumeError(f'{kind} "{name}" not found')
    data: dict[str, bytes] = {}
    if kind == "secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    else:
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    items = src.get("items")
    if not items:
        return {k: (v, mode) for k, v in data.items()}
    files: Files = {}
    for it in items:
        if it["key"] not in data:
            if src.get("optional"):
                continue
            raise VolumeError(f'key "{it["key"]}" not found in {kind} "{name}"')
        files[it["path"]] = (data[it["key"]], it.get("mode", mode))
    return files


def _downward_files(pod: dict[str, Any], items: list[dict[str, Any]], mode: int, pod_ip: str) -> Files:
    files: Files = {}
    containers = {c["name"]: c for c in pod["spec"].get("containers") or []}
    for it in items:
        try:
            if "fieldRef" in it:
                value = field_value(pod, it["fieldRef"]["fieldPath"], pod_ip)
            elif "resourceFieldRef" in it:
                ref = it["resourceFieldRef"]
                container = containers.get(ref.get("containerName", ""), {})
                value = resource_value(container, ref, {})
            else:
                continue
        except ConfigError as e:
            raise VolumeError(str(e)) from e
        files[it["path"]] = (value.encode(), it.get("mode", mode))
    return files


def sync_dir(target: Path, files: Files) -> None:
    """Make `target` hold exactly `files`; only changed files are rewritten (atomically)."""
    target.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for rel, (data, mode) in files.items():
        rel = os.path.normpath(rel)
        if rel.startswith("..") or os.path.isabs(rel):
            raise VolumeError(f"illegal path {rel!r} in volume")
        wanted.add(rel)
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if dest.read_bytes() == data and (dest.stat().st_mode & 0o7777) == mode:
                continue
        except OSError:
            pass
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    for dirpath, _, names in os.walk(target):
        for n in names:
            full = Path(dirpath) / n
            if os.path.relpath(full, target) not in wanted:
                full.unlink(missing_ok=True)


def link_mounts(
    root: Path, paths: PodPaths, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]
) -> Path:
    """Create the container's root with one symlink per volumeMount; return the root."""
    croot = paths.container_root(container["name"])
    if croot.exists():
        shutil.rmtree(croot)
    croot.mkdir(parents=True)
    vols = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts = sorted(container.get("volumeMounts") or [], key=lambda m: len(m["mountPath"]))
    has_sa = False
    linked: dict[Path, str] = {}  # link path -> the mountPath it came from
    for m in mounts:
        vol = vols.get(m["name"])
        if vol is None:
            raise VolumeError(f'volumeMount "{m["name"]}" names no volume of the pod')
        src = volume_dir(root, paths, pod, vol)
        sub = m.get("subPath") or (expand(m["subPathExpr"], env) if m.get("subPathExpr") else "")
        if sub:
            src = src / sub
            if not src.exists() and volume_kind(vol) in ("emptyDir", "hostPath", "persistentVolumeClaim"):
                src.mkdir(parents=True, exist_ok=True)
        _symlink(croot, m["mountPath"], src, linked)
        has_sa = has_sa or os.path.normpath(m["mountPath"]) == SA_MOUNT
    if not has_sa and pod["spec"].get("automountServiceAccountToken") is not False:
        _symlink(croot, SA_MOUNT, paths.identity / "serviceaccount", linked, "the kubelet's serviceaccount mount ")
    return croot


def _symlink(croot: Path, mount_path: str, src: Path, linked: dict[Path, str], what: str = "") -> None:
    """Link croot/<mount_path> to src; refuse a mountPath nested inside another mount.

    A nested mount (hostPath at /data, configMap at /data/cfg) would be created through the outer
    mount's symlink, i.e. in the volume or host directory itself; refusing keeps mkdir and rmtree
    inside the container root.
    """
    rel = os.path.normpath(mount_path).lstrip("/")
    if not rel or rel == "." or rel.startswith(".."):
        raise VolumeError(f"{what}mountPath {mount_path!r} is not a path inside the container")
    link = croot / rel
    parent = croot
    for part in Path(rel).parts[:-1]:
        parent = parent / part
        if parent.is_symlink():
            outer = linked.get(parent, "/" + str(parent.relative_to(croot)))
            raise VolumeError(
                f"{what}mountPath {mount_path!r} is nested inside mountPath {outer!r}: "
                "the process kubelet cannot mount a volume inside another volume"
            )
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)  # a real directory of the container root (no symlink on the way)
    elif link.exists():
        link.unlink()
    link.symlink_to(src.resolve() if src.exists() else src)
    linked[link] = mount_path
