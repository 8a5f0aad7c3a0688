"""What `pip install .` ships: the product's packages and console scripts only, never the dev tools or tests.
The images are built from this wheel, so this is also what runs in production."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = {"zstack_node", "zstack_operator", "zstack_cli", "zstack_kube"}
PRODUCT_SCRIPTS = {"zstack-node", "zstack-operator", "zstack-cli"}

pytestmark = pytest.mark.timeout(300)


def build_wheel(project: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(project)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def top_level_packages(wheel: Path) -> set[str]:
    names = zipfile.ZipFile(wheel).namelist()
    return {name.split("/")[0] for name in names if "/" in name and ".dist-info/" not in name}


def test_the_product_wheel_holds_the_product_only(tmp_path: Path) -> None:
    wheel = build_wheel(REPO, tmp_path)
    assert top_level_packages(wheel) == PRODUCT_PACKAGES
    names = zipfile.ZipFile(wheel).namelist()
    assert "zstack_node/manifests/mn-rbac.yaml" in names, "the MN's RBAC manifest ships as package data"
    scripts = tomllib.loads(REPO.joinpath("pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == PRODUCT_SCRIPTS


@pytest.mark.parametrize(("folder", "package", "script"), [("devcluster", "zstack_devcluster", "zstack-dev"),
                                                           ("bench", "zstack_bench", "zstack-bench")])
def test_each_dev_tool_is_a_distribution_of_its_own(tmp_path: Path, folder: str, package: str, script: str) -> None:
    wheel = build_wheel(REPO / folder, tmp_path)
    assert top_level_packages(wheel) == {package}
    project = tomllib.loads((REPO / folder / "pyproject.toml").read_text())["project"]
    assert set(project["scripts"]) == {script}
