"""Where everything lives inside a devcluster directory (default ``.dev/``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster.pki import Pki

DEFAULT_DIR = ".dev"
DIR_ENV = "ZSTACK_DEV_DIR"
NODE_NAME = "devcluster"


def resolve_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """Absolute devcluster directory: the argument, else $ZSTACK_DEV_DIR, else ``./.dev``."""
    return Path(value or os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser().resolve()


@dataclass(frozen=True)
class Layout:
    """Paths under one devcluster directory."""

    root: Path

    @property
    def pki(self) -> Pki:
        return Pki(self.root / "pki")

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig users and tests point KUBECONFIG at."""
        return self.root / "kubeconfig"

    def component_kubeconfig(self, name: str) -> Path:
        return self.root / "kubeconfigs" / f"{name}.kubeconfig"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"
