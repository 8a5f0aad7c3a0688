"""Each default and the version have one home in Python (zstack_node.config.Settings, pyproject.toml through
zstack_node.version). Files that cannot import Python (the CRD, the chart, the examples, the Dockerfile) repeat
them: these checks keep every copy equal to its home, so a change in one place fails here until all agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from zstack_node.config import default
from zstack_node.version import NODE_IMAGE, VERSION
from zstack_operator.managed import POSTGRES_IMAGE, RABBITMQ_IMAGE

REPO = Path(__file__).resolve().parents[1]


def crd_spec() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "zstackcluster.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_the_installed_version_is_pyprojects() -> None:
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == VERSION


@pytest.mark.parametrize(("field", "setting"), [("heartbeatIntervalSeconds", "heartbeat_interval"),
                                                ("heartbeatTimeoutSeconds", "heartbeat_timeout"),
                                                ("leaseDurationSeconds", "lease_duration"),
                                                ("ringVirtualNodes", "ring_vnodes")])
def test_crd_node_defaults_are_the_mns(field: str, setting: str) -> None:
    assert crd_spec()["node"]["properties"][field]["default"] == default(setting), f"spec.node.{field}"


def test_crd_api_port_and_image_defaults_are_the_mns() -> None:
    spec = crd_spec()
    assert spec["api"]["properties"]["port"]["default"] == default("http_port")
    assert spec["image"]["default"] == NODE_IMAGE
    assert NODE_IMAGE in spec["image"]["description"]


# A patch release: RabbitMQ numbers it major.minor.patch, PostgreSQL (10 and later) major.minor.
@pytest.mark.parametrize(("section", "image", "release"), [("broker", RABBITMQ_IMAGE, r"\d+\.\d+\.\d+"),
                                                           ("database", POSTGRES_IMAGE, r"\d+\.\d+")])
def test_managed_images_are_the_operators_and_pinned_to_a_patch_release(section: str, image: str,
                                                                         release: str) -> None:
    managed = crd_spec()[section]["properties"]["managed"]["properties"]["image"]
    assert managed["default"] == image and image in managed["description"], f"spec.{section}.managed.image"
    assert re.fullmatch(rf"[a-z0-9/._-]+:{release}(-[a-z0-9.]+)?", image), f"{image}: not a pinned patch release"
    example = yaml.safe_load((REPO / "examples" / "zstackcluster.yaml").read_text())
    assert example["spec"][section]["managed"]["image"] == image


@pytest.mark.parametrize("example", ["zstackcluster.yaml", "zstackcluster-kind.yaml"])
def test_examples_run_this_versions_mn_image(example: str) -> None:
    assert yaml.safe_load((REPO / "examples" / example).read_text())["spec"]["image"] == NODE_IMAGE


def test_chart_and_dockerfile_carry_this_version() -> None:
    chart = yaml.safe_load((REPO / "charts" / "zstack-operator" / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (VERSION, VERSION)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VERSION=(\S+)$", dockerfile, re.M).group(1) == VERSION
    tags = set(re.findall(r"-t zstack-(?:node|operator):(\S+)", dockerfile))
    assert tags == {VERSION}, f"the Dockerfile's usage lines tag {tags}"
