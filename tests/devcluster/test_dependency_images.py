"""Our RabbitMQ and PostgreSQL images (images/, built by `zstack-dev images`) meet the image contract the
operator's managed dependencies rely on (docs/IMAGES.md), shown by running them as the operator's pods would.

The pod is taken from the operator itself (zstack_operator.managed, with our image in spec.*.managed.image):
its env (the Secret's values filled in), its volume mounts, its probes' exact commands, its user and fsGroup.
Each image runs its own entrypoint and command, as its own USER, in a buildah working container (chroot
isolation) inside a network namespace of the test's own that holds only loopback. So the servers listen on
the contract's ports (5432; 5672, epmd's 4369, the Erlang distribution's 25672) without meeting anything else
on this machine, and the clients (psycopg2, pika) open their sockets from a thread that joined that namespace,
to 127.0.0.1 only. As kubelet does, the test gives each volume a fresh directory group-owned by the fsGroup
and writes /etc/hosts (the pod's host name on its address, here loopback); as a container runtime does, a
mount replaces the anonymous VOLUME the image declares at the same path.

The first build on a machine takes a few minutes (the Debian base, then the packages); later ones reuse the
cache in ~/.cache/zstack-dev/images.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pika
import psycopg2
import pytest
from pika.exceptions import ProbableAuthenticationError

from zstack_devcluster import images
from zstack_devcluster.localnodes import wait_until
from zstack_operator import credentials, managed
from zstack_operator.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
LOOPBACK = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def built() -> dict[str, images.Built]:
    return {image.target: image for image in images.build(only=images.DEPENDENCIES)}


# ---- the operator's pods ----------------------------------------------------------------------------------


def operator_pod(dependency: str, image: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(pod spec, its one container, the Secret's values) the operator makes for `dependency` on `image`."""
    section = {"rabbitmq": "broker", "postgresql": "database"}[dependency]
    cluster = Cluster("demo", "default", "uid-1", 1, {section: {"managed": {"image": image}}}, {})
    statefulset = getattr(managed, dependency)(cluster)[0]
    secret = getattr(credentials, f"{section}_secret")(cluster)["stringData"]
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container, secret


def env_of(container: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    return {item["name"]: item["value"] if "value" in item else secret[item["valueFrom"]["secretKeyRef"]["key"]]
            for item in container["env"]}


def probe(container: dict[str, Any], kind: str) -> list[str]:
    return container[f"{kind}Probe"]["exec"]["command"]


# ---- a network namespace and a container in it ---------------------------------------------------------------


class NetNS:
    """A network namespace of the test's own (`ip netns`): loopback only, up."""

    def __init__(self) -> None:
        self.name = f"zsd-img-{uuid.uuid4().hex[:8]}"
        self.path = Path("/run/netns") / self.name
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        info = os.stat(self.path)
        self._id = (info.st_dev, info.st_ino)

    def pids(self) -> list[int]:
        """The processes inside it."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                info = os.stat(f"/proc/{entry}/ns/net") if entry.isdigit() else None
            except OSError:
                continue  # gone meanwhile
            if info is not None and (info.st_dev, info.st_ino) == self._id:
                found.append(int(entry))
        return found

    def kill_all(self) -> list[int]:
        """SIGKILL whatever runs inside (what a pod's end does); the pids it killed, once all are gone."""
        left = self.pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.pids(), 30, f"the processes in {self.name} to end")
        return left

    def call(self, fn: Callable[[], T], timeout: float = 60) -> T:
        """`fn()` in a thread that joined the namespace: the sockets it opens stay in there."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({self.path})")
                finally:
                    os.close(fd)
                outcome["value"] = fn()
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=run, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{fn} did not return within {timeout}s in {self.name}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def listening(self, pid: int) -> set[tuple[str, int]]:
        """(address, port) of the TCP sockets listening in the namespace of `pid`: 0.0.0.0 or :: is any."""
        found = set()
        for table, any_address in (("tcp", "0.0.0.0"), ("tcp6", "::")):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port = local.split(":")
                if state == "0A":  # LISTEN
                    found.add((any_address if set(address) == {"0"} else address, int(port, 16)))
        return found

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=True)


class Run:
    """One `buildah run` of a container's command: its process, its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)

    def output(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def main_pid(self) -> int:
        """The container's own process (below buildah's chroot helpers), once it runs."""
        def find() -> int | None:
            assert self.popen.poll() is None, f"the container exited ({self.popen.returncode}):\n{self.output()}"
            parents: dict[int, list[int]] = {}
            for entry in os.listdir("/proc"):
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
                except OSError:
                    continue
                if stat:
                    parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            queue = list(parents.get(self.popen.pid, []))
            while queue:
                pid = queue.pop(0)
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue
                if "buildah" not in comm:
                    return pid
                queue += parents.get(pid, [])
            return None

        return wait_until(find, 60, "the container's process")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 120) -> int:
        """Send `sig` to the container's process (what kubelet does on a pod's deletion); its exit code."""
        os.kill(self.main_pid(), sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit {timeout}s after {sig.name}:\n{self.output()}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(30)


class Container:
    """A working container of `image`, run in `netns` like the operator's `pod` runs its one container."""

    def __init__(self, image: str, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str],
                 netns: NetNS, workdir: Path, hostname: str) -> None:
        self.image, self.netns, self.workdir, self.hostname, self.env = image, netns, workdir, hostname, env
        self.user, self.group = pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]
        self.name = images.buildah("from", "--pull=never", "--name", f"zsd-img-test-{uuid.uuid4().hex[:8]}",
                                   image).stdout.strip()
        self.runs: list[Run] = []
        self.volumes: dict[str, Path] = {}
        emptydirs = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
        for mount in container["volumeMounts"]:
            self.volumes[mount["mountPath"]] = self._volume(mount["name"], mount["name"] in emptydirs)
        declared = images.image_config(image).get("Volumes") or {}
        for path in declared:
            if path in self.volumes:
                images.buildah("config", "--volume", f"{path}-", self.name)
        self.hosts = workdir / "hosts"
        self.hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                              f"{LOOPBACK}\t{hostname}\n")
        self.hosts.chmod(0o644)
        # buildah's chroot isolation drops a mount whose path crosses a symlink (/var/run -> /run), which a
        # container runtime follows inside the root filesystem: resolve the paths in there first. That bare
        # run also shows what buildah itself changes in the root filesystem (its /run/.containerenv).
        initial = self.rootfs()
        targets = self.exec(["readlink", "-f", *self.volumes], mounts=False).stdout.split()
        self.mount_targets = dict(zip(self.volumes, targets, strict=True))
        self.initial_rootfs = self.rootfs()
        self.buildah_writes = changed(initial, self.initial_rootfs)

    def _volume(self, name: str, emptydir: bool) -> Path:
        """A fresh directory as kubelet hands it over with fsGroup: root-owned, group fsGroup, setgid, group
        writable (an emptyDir is writable by all too)."""
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True)
        os.chown(path, 0, self.group)
        path.chmod(0o2777 if emptydir else 0o2775)
        return path

    def _argv(self, argv: list[str], env: dict[str, str], mounts: bool = True) -> list[str]:
        volumes = [arg for path, source in self.volumes.items() if mounts
                   for arg in ("--volume", f"{source}:{self.mount_targets[path]}")]
        envs = [arg for key, value in {**self.env, **env}.items() for arg in ("--env", f"{key}={value}")]
        return ["nsenter", f"--net={self.netns.path}",
                *images.buildah_argv("run", "--isolation", "chroot", "--hostname", self.hostname, "--no-hosts",
                                     "--volume", f"{self.hosts}:/etc/hosts:ro", *volumes, *envs, self.name, "--",
                                     *argv)]

    def start(self, **env: str) -> Run:
        """The image's entrypoint and command (the operator sets neither), with the pod's env and `env`."""
        config = images.image_config(self.image)
        command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
        run = Run(self._argv(command, env), self.workdir / f"run-{len(self.runs)}.log")
        self.runs.append(run)
        return run

    def exec(self, argv: list[str], timeout: float = 120, mounts: bool = True) -> subprocess.CompletedProcess[str]:
        """`argv` in the running container, as kubelet runs an exec probe (the image's user, the pod's env)."""
        return subprocess.run(self._argv(argv, {}, mounts), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def probe_passes(self, argv: list[str]) -> bool:
        return self.exec(argv, timeout=60).returncode == 0

    def rootfs(self) -> dict[str, tuple[int, ...]]:
        """What the container's root filesystem holds: path -> (mode, uid, gid, size, mtime)."""
        root = images.buildah("mount", self.name).stdout.strip()
        try:
            found: dict[str, tuple[int, ...]] = {}
            for directory, dirnames, filenames in os.walk(root):
                for entry in (*dirnames, *filenames):
                    path = os.path.join(directory, entry)
                    info = os.lstat(path)
                    found[os.path.relpath(path, root)] = (info.st_mode, info.st_uid, info.st_gid, info.st_size,
                                                          info.st_mtime_ns)
            return found
        finally:
            images.buildah("umount", self.name)

    def written(self) -> set[str]:
        """The paths of the root filesystem the image changed since the container was made (buildah's own
        changes aside)."""
        return changed(self.initial_rootfs, self.rootfs()) - self.buildah_writes

    def remove(self) -> None:
        for run in self.runs:
            run.kill()
        images.buildah("rm", self.name)


def changed(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def process_ids(pid: int) -> tuple[int, int]:
    """(uid, gid) a process runs as."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0])


def tcp_open(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=2):
        return True


@pytest.fixture
def netns() -> Iterator[NetNS]:
    namespace = NetNS()
    try:
        yield namespace
    finally:
        namespace.kill_all()
        namespace.delete()


def make_container(dependency: str, built: dict[str, images.Built], netns: NetNS,
                   tmp_path: Path) -> tuple[Container, dict[str, Any]]:
    pod, spec, secret = operator_pod(dependency, built[dependency].name)
    container = Container(built[dependency].name, pod, spec, env_of(spec, secret), netns, tmp_path,
                          f"demo-{dependency}-0")
    return container, spec


# ---- the Dockerfiles and the image configs ----------------------------------------------------------------


@pytest.mark.parametrize("dependency", images.DEPENDENCIES)
def test_each_dockerfile_builds_on_a_pinned_public_debian_for_docker_users(dependency: str) -> None:
    text = images.dockerfile(dependency).read_text()
    default = re.search(r"^ARG DEBIAN_IMAGE=(\S+)$", text, re.M)
    assert default and re.fullmatch(r"debian:bookworm-\d{8}-slim", default.group(1)), "a dated tag, never floating"
    assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}$", text, re.M)
    assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text, "small: no apt leftovers"


@pytest.mark.parametrize("dependency", images.DEPENDENCIES)
def test_each_image_runs_as_the_operators_numeric_user_and_exposes_its_port(
        dependency: str, built: dict[str, images.Built]) -> None:
    pod, container, _secret = operator_pod(dependency, built[dependency].name)
    config = images.image_config(built[dependency].name)
    security = pod["securityContext"]
    assert config["User"] == f"{security['runAsUser']}:{security['runAsGroup']}", "numeric, for runAsNonRoot"
    assert {f"{port['containerPort']}/tcp" for port in container["ports"]} <= set(config["ExposedPorts"])
    assert "command" not in container and "args" not in container, "the image's own entrypoint and command run"
    assert built[dependency].name == f"localhost/zstack-{dependency}:{images.pinned_version(dependency)}-bookworm"
    assert config["Labels"]["org.opencontainers.image.version"] == images.pinned_version(dependency)


def test_postgresql_image_config(built: dict[str, images.Built]) -> None:
    config = images.image_config(built["postgresql"].name)
    assert config["Entrypoint"] == ["docker-entrypoint.sh"]
    assert config["Cmd"] == ["postgres"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].split(":")[0] == "/usr/lib/postgresql/15/bin"
    assert env["PGDATA"] == "/var/lib/postgresql/data"
    assert config["StopSignal"] == "SIGINT"


def test_rabbitmq_image_config(built: dict[str, images.Built]) -> None:
    config = images.image_config(built["rabbitmq"].name)
    assert not config.get("Entrypoint")
    assert config["Cmd"] == ["rabbitmq-server"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/var/lib/rabbitmq", "the Erlang cookie lives on the data volume"
    assert env["RABBITMQ_LOGS"] == "-", "logs go to stdout"
    assert env["PATH"].split(":")[0] == "/usr/lib/rabbitmq/bin"


# ---- PostgreSQL ------------------------------------------------------------------------------------------------


def test_postgresql_initialises_an_empty_volume_with_password_auth_and_keeps_its_data_across_a_restart(
        built: dict[str, images.Built], netns: NetNS, tmp_path: Path) -> None:
    container, spec = make_container("postgresql", built, netns, tmp_path)
    try:
        env = container.env
        port = spec["ports"][0]["containerPort"]
        ready, alive = probe(spec, "readiness"), probe(spec, "liveness")
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        read_only = "the root filesystem must stay read-only, yet the image wrote {}"

        first = container.start()
        wait_until(lambda: container.probe_passes(ready), 180, f"the readiness probe {ready}")
        assert "PostgreSQL init process complete" in first.output(400)
        server = first.main_pid()
        assert process_ids(server) == (70, 70)
        assert ("0.0.0.0", port) in netns.listening(server), "listens on every address, for remote hosts"
        assert container.probe_passes(alive)
        assert not container.written(), read_only.format(sorted(container.written()))

        def connect(password: str) -> Any:
            return psycopg2.connect(host=LOOPBACK, port=port, user=env["POSTGRES_USER"], password=password,
                                    dbname=env["POSTGRES_DB"], connect_timeout=10)

        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            netns.call(lambda: connect("not-" + env["POSTGRES_PASSWORD"]))
        conn = netns.call(lambda: connect(env["POSTGRES_PASSWORD"]))
        with conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), current_setting('server_encoding'), "
                        "current_setting('password_encryption'), "
                        "(SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = current_user)")
            assert cur.fetchone() == (env["POSTGRES_USER"], env["POSTGRES_DB"], "UTF8", "scram-sha-256", True)
            cur.execute("CREATE TABLE contract (id int PRIMARY KEY, note text)")
            cur.execute("INSERT INTO contract VALUES (1, 'kept across a restart')")
        conn.close()

        assert first.stop(signal.SIGTERM) == 0, first.output()  # what kubelet sends
        pgdata = container.volumes["/var/lib/postgresql/data"] / Path(env["PGDATA"]).name
        assert (pgdata / "PG_VERSION").read_text().strip() == "15"
        assert (pgdata.stat().st_uid, pgdata.stat().st_mode & 0o777) == (70, 0o700)
        assert not container.written(), read_only.format(sorted(container.written()))

        second = container.start()
        wait_until(lambda: container.probe_passes(ready), 180, f"the readiness probe {ready} after a restart")
        assert "init process complete" not in second.output(400), "an existing PGDATA is not initialised again"
        conn = netns.call(lambda: connect(env["POSTGRES_PASSWORD"]))
        with conn, conn.cursor() as cur:
            cur.execute("SELECT note FROM contract WHERE id = 1")
            assert cur.fetchone() == ("kept across a restart",)
        conn.close()
        assert second.stop(signal.SIGTERM) == 0, second.output()
    finally:
        container.remove()
    assert not netns.pids(), "nothing of PostgreSQL outlives its container"


def test_postgresql_refuses_to_initialise_without_a_password(built: dict[str, images.Built], netns: NetNS,
                                                             tmp_path: Path) -> None:
    container, _spec = make_container("postgresql", built, netns, tmp_path)
    try:
        run = container.start(POSTGRES_PASSWORD="")
        assert run.popen.wait(120) != 0
        assert "POSTGRES_PASSWORD is empty" in run.output()
        assert not any(container.volumes["/var/lib/postgresql/data"].iterdir()), "nothing written"
    finally:
        container.remove()


# ---- RabbitMQ --------------------------------------------------------------------------------------------------


def test_rabbitmq_creates_the_env_user_on_a_fresh_volume_passes_its_probes_and_keeps_messages_across_a_restart(
        built: dict[str, images.Built], netns: NetNS, tmp_path: Path) -> None:
    container, spec = make_container("rabbitmq", built, netns, tmp_path)
    try:
        env = container.env
        port = spec["ports"][0]["containerPort"]
        ready, alive = probe(spec, "readiness"), probe(spec, "liveness")
        data = container.volumes["/var/lib/rabbitmq"]

        first = container.start()
        wait_until(lambda: netns.call(lambda: tcp_open(port), timeout=10), 240, f"AMQP on {LOOPBACK}:{port}")
        wait_until(lambda: container.probe_passes(ready), 120, f"the readiness probe {ready}")
        assert container.probe_passes(alive), container.exec(alive)
        server = first.main_pid()
        assert process_ids(server) == (100, 101)
        listening = netns.listening(server)
        assert ("0.0.0.0", port) in listening or ("::", port) in listening, listening
        assert "Server startup complete" in first.output(400), "logs go to stdout"
        writable = container.exec(["sh", "-c", "test -w /etc/rabbitmq/enabled_plugins && test -w /etc/rabbitmq/conf.d"])
        assert writable.returncode == 0, "the user may rewrite /etc/rabbitmq (rabbitmq-plugins does)"
        cookie = data / ".erlang.cookie"
        assert (cookie.stat().st_uid, cookie.stat().st_mode & 0o777) == (100, 0o400), "made on the fresh volume"

        def connect(user: str, password: str) -> pika.BlockingConnection:
            params = pika.ConnectionParameters(LOOPBACK, port, "/", pika.PlainCredentials(user, password),
                                               connection_attempts=1, socket_timeout=10,
                                               blocked_connection_timeout=10)
            return pika.BlockingConnection(params)

        with pytest.raises(ProbableAuthenticationError):
            netns.call(lambda: connect("guest", "guest"))
        conn = netns.call(lambda: connect(env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]))
        channel = conn.channel()
        channel.confirm_delivery()  # each publish returns once the broker has the message
        channel.queue_declare("contract", durable=True)
        persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        channel.basic_publish("", "contract", b"one", properties=persistent)
        _method, _props, body = wait_until(lambda: _get(channel), 30, "the message back")
        assert body == b"one"
        channel.basic_publish("", "contract", b"kept", properties=persistent)
        conn.close()

        assert first.stop(signal.SIGTERM) == 0, first.output()
        netns.kill_all()  # the end of the pod: its epmd too

        # The user is made at the first start only: a restart on the same volume keeps its password.
        second = container.start(RABBITMQ_DEFAULT_PASS="changed-" + secrets.token_hex(4))
        wait_until(lambda: netns.call(lambda: tcp_open(port), timeout=10), 240, "AMQP after a restart")
        wait_until(lambda: container.probe_passes(ready), 120, f"the readiness probe {ready} after a restart")
        conn = netns.call(lambda: connect(env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]))
        channel = conn.channel()
        _method, _props, body = wait_until(lambda: _get(channel), 30, "the persistent message after a restart")
        assert body == b"kept"
        conn.close()
        assert second.stop(signal.SIGTERM) == 0, second.output()
    finally:
        container.remove()


def _get(channel: Any) -> tuple[Any, Any, bytes] | None:
    method, props, body = channel.basic_get("contract", auto_ack=True)
    return (method, props, body) if method is not None else None
