"""The on-disk layout of one pod under the kubelet's root directory.

    ROOT/pods/<namespace>_<name>_<uid>/
        volumes/<volume>/...        materialized volumes (configMap, secret, emptyDir, ...)
        roots/<container>/          the container's "/": every volumeMount's mountPath is a
                                    symlink in here, e.g. roots/app/etc/config -> ../../../volumes/config
        identity/                   the pod's ServiceAccount token and kubeconfig
        logs/<container>.log        stdout + stderr of every run of the container
        run/<container>.pid         "<pid> <starttime>" of the running process (orphan cleanup)
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


def _safe(name: str) -> str:
    """Names from the API are DNS labels already; be defensive anyway."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass(frozen=True)
class PodPaths:
    """Directories and files of one pod."""

    base: Path

    @classmethod
    def for_pod(cls, root: Path, namespace: str, name: str, uid: str) -> PodPaths:
        return cls(root / "pods" / f"{_safe(namespace)}_{_safe(name)}_{_safe(uid)}")

    @property
    def volumes(self) -> Path:
        return self.base / "volumes"

    @property
    def identity(self) -> Path:
        return self.base / "identity"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def run(self) -> Path:
        return self.base / "run"

    def volume(self, name: str) -> Path:
        return self.volumes / _safe(name)

    def container_root(self, container: str) -> Path:
        return self.base / "roots" / _safe(container)

    def log(self, container: str) -> Path:
        return self.logs / f"{_safe(container)}.log"

    def pidfile(self, container: str) -> Path:
        return self.run / f"{_safe(container)}.pid"

    def create(self) -> None:
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)  # volumes, tokens and logs may hold secrets
        for d in (self.volumes, self.identity, self.logs, self.run, self.base / "roots"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.identity, 0o700)

    def cleanup(self) -> None:
        """Remove everything but the logs (secrets and tokens must not linger)."""
        for d in (self.volumes, self.identity, self.run, self.base / "roots"):
            shutil.rmtree(d, ignore_errors=True)
