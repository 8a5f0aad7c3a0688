"""The product's version. Its one home is pyproject.toml; Python reads it from the installed metadata, and
tests/test_versions.py checks that the charts, CRD, examples and Dockerfile name the same one."""

from __future__ import annotations

from importlib.metadata import version

VERSION = version("zstack-k8s")
NODE_IMAGE = f"zstack-node:{VERSION}"  # the MN image a ZStackCluster runs unless spec.image says otherwise
