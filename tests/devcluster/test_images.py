"""`zstack-dev images`: both Dockerfile targets built here from a Debian base (mmdebstrap, buildah), never
from Docker Hub, and what they hold checked by running them (buildah run, chroot isolation).

The first build on a machine takes a few minutes (the base, then the dependencies' layer); later ones reuse
the cache in ~/.cache/zstack-dev/images.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from zstack_devcluster import images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SCRIPTS = {"node": ("zstack-node", "8080/tcp"), "operator": ("zstack-operator", "8081/tcp")}


@pytest.fixture(scope="module")
def built(images_built: subprocess.CompletedProcess[str]) -> dict[str, images.Built]:
    proc = images_built
    assert "building localhost/zstack-node" in proc.stderr, "the build shows its progress"
    names = dict(line.split("\t") for line in proc.stdout.splitlines())
    return {target: images.Built(target, images.image_name(target), Path(names[images.image_name(target)]), 0)
            for target in images.TARGETS}


def run_in(image: str, *argv: str) -> str:
    """Run `argv` in a working container of `image` as its configured user; its output."""
    container = images.buildah("from", "--pull=never", image).stdout.strip()
    try:
        return images.buildah("run", "--isolation", "chroot", container, "--", *argv).stdout
    finally:
        images.buildah("rm", container)


@pytest.fixture(params=images.TARGETS)
def target(request: pytest.FixtureRequest, built: dict[str, images.Built]) -> Iterator[images.Built]:
    yield built[request.param]


def test_each_image_runs_its_console_script_as_the_numeric_non_root_user(target: images.Built) -> None:
    script, port = SCRIPTS[target.target]
    config = images.image_config(target.name)
    assert config["User"] == "65532:65532", "Kubernetes' runAsNonRoot needs a numeric user"
    assert config["Entrypoint"] == [script]
    assert port in config["ExposedPorts"]
    assert config["Labels"]["org.opencontainers.image.title"] == script
    assert run_in(target.name, script, "--version").strip() == f"{script}, version {images.version()}"
    assert run_in(target.name, "id", "-u").strip() == "65532"


def test_images_hold_the_product_and_no_dev_tooling(target: images.Built) -> None:
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
             "('zstack_node', 'zstack_operator', 'zstack_cli', 'zstack_kube', 'zstack_devcluster', 'zstack_bench', "
             "'pytest', 'tests')}))")
    found = json.loads(run_in(target.name, "python", "-c", probe))
    assert found == {"zstack_node": True, "zstack_operator": True, "zstack_cli": True, "zstack_kube": True,
                     "zstack_devcluster": False, "zstack_bench": False, "pytest": False, "tests": False}


def test_each_image_is_exported_as_an_oci_archive_for_ctr_import(target: images.Built) -> None:
    with tarfile.open(target.archive) as archive:
        names = set(archive.getnames())
        assert {"oci-layout", "index.json"} <= names
        index = json.load(archive.extractfile("index.json"))
    (manifest,) = index["manifests"]
    # The full name: containerd files a name without a registry under docker.io/library/, where no pod looks.
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == target.name


def test_the_base_is_debian_made_here_not_pulled() -> None:
    images.ensure_base(say=lambda _msg: None)
    os_release = run_in(images.BASE_IMAGE, "cat", "/etc/os-release")
    assert 'VERSION_CODENAME=bookworm' in os_release
    assert images.image_config(images.BASE_IMAGE)["Labels"][images.BASE_LABEL].startswith("debian-bookworm-")


def test_an_image_whose_inputs_are_unchanged_is_not_built_again(built: dict[str, images.Built]) -> None:
    archive = built["operator"].archive
    before = archive.stat().st_mtime_ns
    said: list[str] = []
    (again,) = images.build(say=said.append, only=["operator"])
    assert again.archive == archive and archive.stat().st_mtime_ns == before, "an up-to-date image was rebuilt"
    assert any("localhost/zstack-operator" in line and "is up to date" in line for line in said), said


def test_the_inputs_are_the_context_that_dockerignore_leaves_in(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("# the build reads only the package\ntests\n**/__pycache__\n*.egg-info/\n")
    for name in ("README.md", "pkg/mod.py", "pkg/sub/__pycache__/mod.pyc", "tests/test_mod.py",
                 "pkg.egg-info/PKG-INFO", "pkg/sub/data.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    found = {str(path.relative_to(tmp_path)) for path in images.context_files(tmp_path)}
    assert found == {".dockerignore", "README.md", "pkg/mod.py", "pkg/sub/data.json"}
    (tmp_path / ".dockerignore").write_text("tests\n!tests/keep.py\n")  # exceptions: every file counts
    assert "tests/test_mod.py" in {str(path.relative_to(tmp_path)) for path in images.context_files(tmp_path)}
