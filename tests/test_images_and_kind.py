"""The container images, the kind cluster and the Makefile targets that tie them together.

Docker and kind do not run here, so the files are checked statically: the Dockerfile's `node` and `operator`
targets through a small instruction parser, kind-config.yaml against the field names of kind's own config
types, the Makefile through `make -n` (and through a PATH without the tools), the Helm values it sets through
`helm template`. examples/zstackcluster-kind.yaml goes to the devcluster's API server (dry run), which
applies the CRD's rules.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KubeCluster
from zstack_devcluster import tools

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SCRIPTS = PYPROJECT["project"]["scripts"]
CRD = REPO / "crds" / "zstackcluster.yaml"
KIND_CONFIG = REPO / "kind-config.yaml"
KIND_EXAMPLE = REPO / "examples" / "zstackcluster-kind.yaml"
CHART = REPO / "charts" / "zstack-operator"
DOCKERFILE = REPO / "Dockerfile"
# Each image: its target stage in the Dockerfile and the console script it runs (also its name).
IMAGES = {"node": "zstack-node", "operator": "zstack-operator"}
VENV = "/opt/venv"


# ---- a small Dockerfile parser -----------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY ...
    args: str
    line: int


@dataclass
class Stage:
    image: str  # the base image, global ARGs substituted (for FROM <an earlier stage>: that stage's base image)
    name: str | None
    parent: Stage | None = None  # the earlier stage this one is FROM, if any
    instructions: list[Instruction] = field(default_factory=list)  # this stage's own

    @property
    def chain(self) -> list[Stage]:
        """The stages this one is built on, the one FROM an image first, then this one."""
        return [*(self.parent.chain if self.parent else []), self]

    def all(self, keyword: str) -> list[Instruction]:
        """The `keyword` instructions of the image this stage builds: its own and those of the stages it is FROM."""
        return [i for stage in self.chain for i in stage.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"the stage {self.name or self.image} (and those it is FROM) has no {keyword}: add one"
        return found[-1]


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # global ARGs (before the first FROM) with their defaults
    stages: list[Stage]

    def stage_names(self) -> set[str]:
        return {stage.name for stage in self.stages if stage.name}

    def stage(self, name: str) -> Stage:
        """The stage `docker build --target <name>` builds (its `chain` follows FROM to the base image)."""
        found = [stage for stage in self.stages if stage.name == name]
        assert found, f"{self.path.name}: no stage named {name!r} (stages: {sorted(self.stage_names())})"
        return found[0]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction text): comments dropped, backslash continuations joined."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(pending)))
        pending = []
    assert not pending, f"the last instruction (line {start}) ends with a backslash"
    return lines


def _substitute(value: str, args: dict[str, str], where: str) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in args, f"{where}: ${name} is not a global ARG with a default (declare ARG {name}=... first)"
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, value)


def parse_dockerfile(path: Path) -> Dockerfile:
    """The global ARGs and the stages of a Dockerfile; a FROM naming an earlier stage builds on it."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, rest = text.partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip(), line)
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            base = _substitute(words[0], args, f"{path.name}:{line}")
            parent = next((s for s in reversed(stages) if s.name and s.name.lower() == base.lower()), None)
            stages.append(Stage(parent.image if parent else base, name, parent))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path.name}:{line}: only ARG may come before the first FROM"
            arg_name, _, default = instruction.args.partition("=")
            args[arg_name] = default
        else:
            stages[-1].instructions.append(instruction)
    assert stages, f"{path}: no FROM instruction"
    return Dockerfile(path, args, stages)


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """A COPY's --flags, sources and destination."""
    words = shlex.split(instruction.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def env_values(stage: Stage) -> dict[str, str]:
    """The ENV settings (key=value form) of the image the stage builds."""
    values: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: write ENV as KEY=value ({word!r})"
            values[key] = value
    return values


def labels(stage: Stage) -> dict[str, tuple[str, Stage]]:
    """The image's labels: value and the stage that sets it (a later stage overrides an earlier one)."""
    found: dict[str, tuple[str, Stage]] = {}
    for owner in stage.chain:
        for instruction in owner.instructions:
            if instruction.keyword == "LABEL":
                for word in shlex.split(instruction.args):
                    key, _, value = word.partition("=")
                    found[key] = (value, owner)
    return found


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> tuple[Dockerfile, Stage, str]:
    """(the parsed Dockerfile, the target stage of the image, the console script it runs), for each image."""
    dockerfile = parse_dockerfile(DOCKERFILE)
    return dockerfile, dockerfile.stage(request.param), IMAGES[request.param]


# ---- the Dockerfile ----------------------------------------------------------------------------------------

PINNED_TAG = re.compile(r"^\d+\.\d+\.\d+(-[\w.-]+)?$")  # an exact patch release, e.g. 3.11.13-slim-bookworm


def test_builds_in_stages_from_one_pinned_base(image: tuple[Dockerfile, Stage, str]) -> None:
    dockerfile, target, _ = image
    for stage in dockerfile.stages:
        repository, _, tag = stage.image.partition("@")[0].rpartition(":")
        assert "@sha256:" in stage.image or PINNED_TAG.match(tag), (
            f"{dockerfile.path}: FROM {stage.image} is not pinned: use an exact version tag such as "
            "python:3.11.13-slim-bookworm (not latest, not a bare major or minor tag)")
        assert repository, f"{dockerfile.path}: FROM {stage.image} names no tag"
    assert {stage.image for stage in dockerfile.stages} == {dockerfile.args.get("PYTHON_IMAGE")}, (
        f"{dockerfile.path}: every stage should be FROM ${{PYTHON_IMAGE}} (the one pinned base) or FROM a stage "
        f"that is (found {[s.image for s in dockerfile.stages]})")
    outside = [stage.name for stage in dockerfile.stages if stage not in target.chain]
    assert outside, (f"{dockerfile.path}: the target {target.name} builds on every stage: build in a builder "
                     "stage and copy into the image")


def test_target_runs_as_numeric_non_root(image: tuple[Dockerfile, Stage, str]) -> None:
    dockerfile, target, _ = image
    user = target.last("USER").args
    assert re.fullmatch(r"\d+(:\d+)?", user), (
        f"{dockerfile.path}: the target {target.name} runs as USER {user}: make it numeric (uid:gid) so that "
        "Kubernetes' runAsNonRoot can check it")
    assert all(int(part) != 0 for part in user.split(":")), f"{dockerfile.path}: USER {user} is root"


def test_entrypoint_is_the_console_script_on_path(image: tuple[Dockerfile, Stage, str]) -> None:
    """The image runs its console script, found on PATH: the operator's MN pods say `command: [zstack-node]`."""
    dockerfile, target, script = image
    entrypoint = target.last("ENTRYPOINT").args
    try:  # exec form, so that SIGTERM (graceful leave) reaches the process itself, not a shell
        argv = json.loads(entrypoint)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list) and argv, (
        f"{dockerfile.path}: ENTRYPOINT {entrypoint}: write it in exec form, [\"{script}\"]")
    assert argv[0] == script, f"{dockerfile.path}: the target {target.name} runs {argv[0]}, not {script}"
    assert script in SCRIPTS, f"{script} is not a console script in pyproject.toml [project.scripts]"
    path = env_values(target).get("PATH", "")
    assert path.split(":")[0] == f"{VENV}/bin", f"{dockerfile.path}: PATH should start with {VENV}/bin ({path!r})"


def test_target_copies_only_the_venv_from_the_builder(image: tuple[Dockerfile, Stage, str]) -> None:
    """From its base image on, the target (and the stages it is FROM) only copies the venv in."""
    dockerfile, target, _ = image
    builders = {stage.name for stage in dockerfile.stages if stage not in target.chain}
    assert not target.all("ADD"), f"{dockerfile.path}: the target {target.name} must not ADD anything"
    assert not target.all("RUN"), (
        f"{dockerfile.path}: the target {target.name} runs something (lines {[i.line for i in target.all('RUN')]}): "
        "install in the builder, so no compiler or package manager cache reaches the image")
    copies = target.all("COPY")
    assert copies, f"{dockerfile.path}: the target {target.name} copies nothing from the builder"
    for instruction in copies:
        flags, sources, dest = copy_parts(instruction)
        assert flags.get("from") in builders, (
            f"{dockerfile.path}:{instruction.line}: the target {target.name} copies from "
            f"{flags.get('from') or 'the context'}, not from a builder stage {sorted(n for n in builders if n)}")
        assert sources == [VENV] and dest == VENV, f"{dockerfile.path}:{instruction.line}: copy only {VENV}"
    env = env_values(target)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1", (
        f"{dockerfile.path}: set ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 (read-only root, logs at once)")


def test_builder_copies_what_the_wheel_needs(image: tuple[Dockerfile, Stage, str]) -> None:
    """The wheel's build reads pyproject.toml, the readme and every package folder: the stages the target copies
    its venv from must copy each, and each must exist and not be kept out of the build context by .dockerignore.
    The dev tools (devcluster/, bench/) are never copied: they are no part of what runs in production."""
    dockerfile, target, _ = image
    copied: set[str] = set()
    builders = sorted({copy_parts(i)[0]["from"] for i in target.all("COPY") if "from" in copy_parts(i)[0]})
    for builder in map(dockerfile.stage, builders):
        for builder_copy in builder.all("COPY"):
            flags, sources, _ = copy_parts(builder_copy)
            if "from" not in flags:
                copied.update(source.rstrip("/") for source in sources)
    package_dirs = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *package_dirs}
    assert needed <= copied, f"{dockerfile.path}: the builder does not copy {sorted(needed - copied)}"
    dev_only = {"devcluster", "bench", "tests"} & copied
    assert not dev_only, f"{dockerfile.path}: the builder copies the dev-only {sorted(dev_only)} into the image"
    ignore = DockerIgnore.load()
    for source in sorted(copied):
        assert (REPO / source).exists(), f"{dockerfile.path}: COPY {source}: no such file in the repository"
        assert not ignore.excludes(source), f".dockerignore keeps {source} (copied by {dockerfile.path}) out"


def test_image_metadata(image: tuple[Dockerfile, Stage, str]) -> None:
    """OCI labels name the image, and the ports it exposes are the one its process listens on by default."""
    from zstack_node.config import Settings
    from zstack_operator.cli import main as operator_main

    dockerfile, target, script = image
    found = labels(target)
    assert found.get("org.opencontainers.image.title", ("",))[0] == script, (
        f"{dockerfile.path}: the target {target.name} should carry the title label {script}")
    assert found.get("org.opencontainers.image.licenses", ("",))[0] == PYPROJECT["project"]["license"]["text"]
    version, owner = found.get("org.opencontainers.image.version", ("", target))
    assert version == "${VERSION}", (
        f"{dockerfile.path}: the version label should come from the VERSION build argument (make images sets it)")
    assert any(i.keyword == "ARG" and i.args.partition("=")[0] == "VERSION" for i in owner.instructions), (
        f"{dockerfile.path}: declare ARG VERSION in the stage {owner.name} that labels the version (a build "
        "argument is visible only in the stage that declares it)")
    operator_port = next(p.default for p in operator_main.params if p.name == "http_port")
    default_port = {"zstack-node": Settings.__dataclass_fields__["http_port"].default,
                    "zstack-operator": operator_port}[script]
    exposed = [port for i in target.all("EXPOSE") for port in i.args.split()]  # EXPOSE adds up along FROM
    assert exposed == [str(default_port)], (
        f"{dockerfile.path}: the target {target.name} exposes {exposed}, but {script} listens on {default_port}")


# ---- .dockerignore ----------------------------------------------------------------------------------------


@dataclass
class DockerIgnore:
    """Docker's .dockerignore rules: a path is out when it or a parent folder matches; `!` re-includes."""

    rules: list[tuple[bool, re.Pattern[str]]]

    @classmethod
    def load(cls) -> DockerIgnore:
        rules = []
        for raw in (REPO / ".dockerignore").read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?"
                            else re.escape(part) for part in re.split(r"(\*\*|\*|\?)", pattern))
            rules.append((keep, re.compile(regex.replace(".*/", "(.*/)?") + r"\Z")))
        return cls(rules)

    def excludes(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for keep, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not keep
        return excluded


def test_dockerignore_keeps_repository_state_out_of_the_context() -> None:
    ignore = DockerIgnore.load()
    for path in (".git/HEAD", ".dev/logs/mn-0.log", "tests/conftest.py",
                 "node/zstack_node/__pycache__/ring.cpython-311.pyc",
                 "devcluster/zstack_devcluster/cli.py", "bench/zstack_bench/cli.py",
                 ".pytest_cache/v/cache", ".ruff_cache/CACHEDIR.TAG", "build/lib/x.py", "dist/x.whl",
                 "zstack_k8s.egg-info/PKG-INFO", ".venv/bin/python"):
        assert ignore.excludes(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "node/zstack_node/ring.py", "operator/zstack_operator/cli.py",
                 "node/zstack_node/manifests/mn-rbac.yaml", "kube/zstack_kube/__init__.py"):
        assert not ignore.excludes(path), f".dockerignore keeps {path} out, but the images need it"


# ---- kind-config.yaml -------------------------------------------------------------------------------------

# The field names of kind's config API v1alpha4, from kubernetes-sigs/kind pkg/apis/config/v1alpha4/types.go at
# commit 00b38e3bbfdd (main branch, after kind v0.23.0: it has networking.dnsSearch from v0.18.0 and
# nodes[].gpus). An older version of the file (commit 0869f15bdb25, before v0.18.0) spells every field that
# kind-config.yaml uses the same way. A dict is a struct whose keys are the only fields; [schema] a list of
# it; ANY a value without fixed field names (a scalar, a string list, or a free-form map such as labels).
ANY = None
_PORT_MAPPING = {"containerPort": ANY, "hostPort": ANY, "listenAddress": ANY, "protocol": ANY}
_MOUNT = {"containerPath": ANY, "hostPath": ANY, "readOnly": ANY, "selinuxRelabel": ANY, "propagation": ANY}
_PATCH_JSON6902 = {"group": ANY, "version": ANY, "kind": ANY, "patch": ANY}
_NODE = {"role": ANY, "image": ANY, "labels": ANY, "extraMounts": [_MOUNT], "extraPortMappings": [_PORT_MAPPING],
         "gpus": ANY, "kubeadmConfigPatches": ANY, "kubeadmConfigPatchesJSON6902": [_PATCH_JSON6902]}
_NETWORKING = {"ipFamily": ANY, "apiServerPort": ANY, "apiServerAddress": ANY, "podSubnet": ANY,
               "serviceSubnet": ANY, "disableDefaultCNI": ANY, "kubeProxyMode": ANY, "dnsSearch": ANY}
KIND_CLUSTER_V1ALPHA4: dict[str, Any] = {
    "kind": ANY, "apiVersion": ANY, "name": ANY, "nodes": [_NODE], "networking": _NETWORKING,
    "featureGates": ANY, "runtimeConfig": ANY, "kubeadmConfigPatches": ANY,
    "kubeadmConfigPatchesJSON6902": [_PATCH_JSON6902], "containerdConfigPatches": ANY,
    "containerdConfigPatchesJSON6902": ANY,
}


def unknown_fields(value: Any, schema: Any, path: str = "") -> list[str]:
    """Where `value` uses a field name (or a shape) that `schema` does not have."""
    if schema is ANY:
        return []
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path or '.'}: expected a list"]
        return [p for n, item in enumerate(value) for p in unknown_fields(item, schema[0], f"{path}[{n}]")]
    if not isinstance(value, dict):
        return [f"{path or '.'}: expected a mapping"]
    problems = []
    for key, item in value.items():
        if key in schema:
            problems += unknown_fields(item, schema[key], f"{path}.{key}")
        else:
            problems.append(f"{path}.{key}: not a field of kind's v1alpha4 config (known: {sorted(schema)})")
    return problems


def kind_config() -> dict[str, Any]:
    return yaml.safe_load(KIND_CONFIG.read_text())


def kind_example() -> dict[str, Any]:
    return yaml.safe_load(KIND_EXAMPLE.read_text())


def test_kind_config_uses_only_kind_field_names() -> None:
    config = kind_config()
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert unknown_fields(config, KIND_CLUSTER_V1ALPHA4) == []
    assert [node["role"] for node in config["nodes"]] == ["control-plane"]
    # The check catches a misspelt field, which kind itself would refuse.
    node = config["nodes"][0]
    typo = {**config, "nodes": [{**node, "extraPortMapping": node["extraPortMappings"]}]}
    assert unknown_fields(typo, KIND_CLUSTER_V1ALPHA4)[0].startswith(".nodes[0].extraPortMapping:")


def test_kind_port_mapping_reaches_the_example_api_service() -> None:
    """The node port the example's API Service takes is the one kind-config.yaml publishes on the host, and
    the URL the example tells users to curl is the published one."""
    (mapping,) = kind_config()["nodes"][0]["extraPortMappings"]
    api = kind_example()["spec"]["api"]
    node_port = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]["properties"]["api"]["properties"]["nodePort"]
    assert api["serviceType"] == "NodePort"
    assert mapping["containerPort"] == api["nodePort"], "kind-config.yaml maps another port than spec.api.nodePort"
    assert node_port["minimum"] <= api["nodePort"] <= node_port["maximum"], "spec.api.nodePort is not a NodePort"
    assert mapping["protocol"] == "TCP"
    url = f"http://{mapping['listenAddress']}:{mapping['hostPort']}/"
    assert f"curl http://{mapping['listenAddress']}:{mapping['hostPort']}/" in KIND_EXAMPLE.read_text(), (
        f"the example's comment should show how to reach the API at {url}")


@pytest.mark.k8s
def test_kind_example_is_accepted_by_the_api_server(devcluster: KubeCluster) -> None:
    """The API server (the CRD's schema and CEL rules) accepts the example; the same check refuses a node port
    outside the range and an unknown Service type, naming the field."""
    devcluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    devcluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/zstackclusters.zstack.io")
    example = kind_example()
    accepted = json.loads(devcluster.kubectl("apply", "--dry-run=server", "-n", "default", "-o", "json",
                                             "-f", str(KIND_EXAMPLE)).stdout)
    # Defaults filled in: the port, and HTTPS (the certificate names localhost, where kind maps the node port).
    assert accepted["spec"]["api"] == {**example["spec"]["api"], "port": 8080, "tls": {"enabled": True}}
    assert accepted["spec"]["replicas"] == 3 and set(accepted["spec"]["broker"]) == {"managed"}
    for api, field_path in (({"nodePort": 8080}, "spec.api.nodePort"), ({"serviceType": "Nodeport"},
                                                                        "spec.api.serviceType")):
        bad = {**example, "spec": {**example["spec"], "api": {**example["spec"]["api"], **api}}}
        refused = devcluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-",
                                     input=json.dumps(bad), check=False)
        assert refused.returncode != 0 and field_path in refused.stderr, refused.stderr


# ---- the Makefile -----------------------------------------------------------------------------------------


def make(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """`make <args>` in the repository, without the caller's make flags or image overrides."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VERSION", "IMAGE_REGISTRY")}
    if path is not None:
        env["PATH"] = path
    make_bin = shutil.which("make")
    assert make_bin, "make is not installed"
    return subprocess.run([make_bin, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def dry_run(*args: str) -> list[str]:
    """The commands `make -n <args>` shows, continuation lines joined."""
    proc = make("-n", *args)
    assert proc.returncode == 0, f"make -n {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return [line.strip() for line in re.sub(r"\s*\\\n\s*", " ", proc.stdout).splitlines()]


def test_make_dry_run_shows_the_kind_path() -> None:
    commands = dry_run("kind-up", "images", "kind-load", "deploy")
    expected = [
        "if kind get clusters 2>/dev/null | grep -qx 'zstack'; then",  # an existing cluster is kept
        "kind create cluster --name zstack --config kind-config.yaml;",
        f"docker build --target node --build-arg VERSION={VERSION} -t zstack-node:{VERSION} .",
        f"docker build --target operator --build-arg VERSION={VERSION} -t zstack-operator:{VERSION} .",
        f"kind load docker-image zstack-node:{VERSION} zstack-operator:{VERSION} --name zstack",
        "helm upgrade --install zstack-operator charts/zstack-operator -n zstack-system --create-namespace --wait "
        f"--set image.repository=zstack-operator --set image.tag={VERSION}",
        f"sed 's|^  image: .*|  image: zstack-node:{VERSION}|' examples/zstackcluster-kind.yaml | kubectl apply -f -",
        f"kubectl wait zsc/{kind_example()['metadata']['name']} --for=condition=Ready --timeout=5m",
    ]
    found = [next((n for n, c in enumerate(commands) if e in c), None) for e in expected]
    missing = [e for e, n in zip(expected, found, strict=True) if n is None]
    assert not missing, "make -n does not show:\n" + "\n".join(missing) + "\nit shows:\n" + "\n".join(commands)
    assert found == sorted(found), "the commands run out of order"  # (equal: one shell line)
    assert kind_config()["name"] == "zstack", "kind-config.yaml names another cluster than the Makefile's"



def test_make_images_builds_each_target_of_the_dockerfile() -> None:
    """Each `docker build` of `make images` builds one target of the root Dockerfile, tagged with the image
    name that target's title label gives, and together they build every image."""
    dockerfile = parse_dockerfile(DOCKERFILE)
    built: dict[str, str] = {}
    for command in dry_run("images"):
        if not command.startswith("docker build "):
            continue
        words = shlex.split(command)
        assert words[-1] == "." and "-f" not in words, f"{command}: build the repository root with ./Dockerfile"
        target = dockerfile.stage(words[words.index("--target") + 1])
        repository = words[words.index("-t") + 1].rpartition(":")[0]
        title = labels(target)["org.opencontainers.image.title"][0]
        assert repository == title, f"{command}: tags the target {target.name} ({title}) as {repository}"
        built[target.name or ""] = repository
    assert built == IMAGES, f"make images builds {built}, not {IMAGES}"

def test_make_image_registry_prefixes_every_image() -> None:
    commands = " ".join(dry_run("images", "kind-load", "deploy", "IMAGE_REGISTRY=registry.example:5000/team/"))
    for image in (f"registry.example:5000/team/zstack-node:{VERSION}",
                  f"registry.example:5000/team/zstack-operator:{VERSION}"):
        assert f"-t {image} " in commands and f" {image} " in commands.split("kind load docker-image")[1]
    assert "--set image.repository=registry.example:5000/team/zstack-operator " in commands
    assert f"image: registry.example:5000/team/zstack-node:{VERSION}|" in commands


@pytest.mark.parametrize(("target", "tool", "how"), [
    ("kind-up", "docker", "install Docker"), ("images", "docker", "install Docker"),
    ("kind-load", "docker", "install Docker"), ("deploy", "helm", "install Helm"),
    ("kind-down", "docker", "install Docker"),
])
def test_make_target_without_its_tools_says_what_to_install(tmp_path: Path, target: str, tool: str,
                                                            how: str) -> None:
    """On a PATH with none of docker, kind, helm or kubectl, each target stops at once naming the tool."""
    for helper in ("sed", "head"):  # what the Makefile's variables use
        (tmp_path / helper).symlink_to(shutil.which(helper) or f"/usr/bin/{helper}")
    proc = make(target, path=str(tmp_path))
    assert proc.returncode != 0
    assert f"make {target}: {tool} not found on PATH; {how}" in proc.stderr, proc.stderr
    assert proc.stdout == "", "the target ran something before checking its tools"


def test_make_deploy_settings_reach_the_chart_and_the_example(tmp_path: Path) -> None:
    """The values `make deploy` sets make the chart run the operator image `make images` built, and the
    ZStackCluster it applies runs the MN image `make images` built."""
    registry = "registry.example:5000/team"
    commands = dry_run("deploy", f"IMAGE_REGISTRY={registry}")
    helm_line = next(c for c in commands if c.startswith("helm upgrade --install"))
    sets = [word for n, word in enumerate(shlex.split(helm_line)) if n and shlex.split(helm_line)[n - 1] == "--set"]
    home = {f"HELM_{kind}_HOME": str(tmp_path / kind) for kind in ("CACHE", "CONFIG", "DATA")}
    rendered = subprocess.run(
        [str(tools.tool_path("helm")), "template", "zstack-operator", str(CHART), "-n", "zstack-system",
         *[arg for value in sets for arg in ("--set", value)]],
        cwd=tmp_path, env={**os.environ, **home}, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    (deployment,) = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{registry}/zstack-operator:{VERSION}"

    apply_line = next(c for c in commands if c.endswith("| kubectl apply -f -"))
    applied = subprocess.run(["bash", "-c", apply_line.removesuffix("| kubectl apply -f -")], cwd=REPO,
                             capture_output=True, text=True, timeout=30, check=True).stdout
    example = kind_example()
    node_image = f"{registry}/zstack-node:{VERSION}"
    assert yaml.safe_load(applied) == {**example, "spec": {**example["spec"], "image": node_image}}
    assert example["spec"]["image"] == f"zstack-node:{VERSION}", (
        "examples/zstackcluster-kind.yaml should name the MN image `make images` builds")
