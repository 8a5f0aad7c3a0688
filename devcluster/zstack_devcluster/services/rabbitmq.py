"""A private RabbitMQ broker from the Debian package, in a directory of its own.

Everything the broker reads or writes is under ``base_dir``: HOME and ``.erlang.cookie``, the mnesia
and log bases, ``rabbitmq.conf``, an empty ``enabled_plugins`` and an empty ``rabbitmq-env.conf`` (so
nothing in /etc/rabbitmq is used). The node name is unique (``zstack-<random>@localhost``); AMQP, the
Erlang distribution and a private epmd listen on free ports of 127.0.0.1. The user and password are
random and created by the broker itself on first boot (``default_user``/``default_pass``).

Startup speed: Erlang loads modules lazily and looks each one up in every directory of the code path.
The package puts all 70 bundled apps on that path, so booting costs ~1000 failed lookups per module. We
hand the server scripts a private RABBITMQ_HOME whose ``plugins/`` holds symlinks to only the ~20 apps
the broker needs (computed from the ``.app`` files), which halves the boot time (about 6s -> 3s here).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from zstack_devcluster.services.base import Say, Service, ServiceError

_VHOST_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_APP_DEPS_RE = re.compile(
    r"\{\s*(?:applications|included_applications|optional_applications)\s*,\s*\[([^\]]*)\]", re.S
)
_ACTING_USER = "devcluster"


def find_server_home(explicit: Path | None = None) -> Path:
    """The ``rabbitmq_server-<version>`` directory (with ``sbin/`` and ``plugins/``) of the installed broker."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if env := os.environ.get("ZSTACK_RABBITMQ_HOME"):
        candidates.append(Path(env))
    script = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if script.exists():
        candidates.append(script.resolve().parent.parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*"), reverse=True)]
    for home in candidates:
        if (home / "sbin" / "rabbitmq-server").is_file() and (home / "plugins").is_dir():
            return home
    raise ServiceError(
        "RabbitMQ is not installed: no rabbitmq_server-*/sbin/rabbitmq-server under /usr/lib/rabbitmq/lib. "
        "Install the Debian package (apt-get install rabbitmq-server) or set ZSTACK_RABBITMQ_HOME."
    )


def _find_erl_call() -> str | None:
    found = shutil.which("erl_call")
    if found:
        return found
    matches = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/erl_call")) or sorted(
        glob.glob("/usr/lib/erlang/lib/erl_interface-*/bin/erl_call"))
    return matches[-1] if matches else None


def needed_apps(plugins_dir: Path, roots: tuple[str, ...] = ("rabbit", "rabbitmq_prelaunch")) -> dict[str, Path]:
    """The bundled apps ``roots`` need (transitively, from their ``.app`` files): name -> app directory."""
    apps: dict[str, Path] = {}
    for entry in plugins_dir.iterdir():
        if entry.is_dir() and "-" in entry.name:
            apps[entry.name.rsplit("-", 1)[0]] = entry
    needed: dict[str, Path] = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in needed or name not in apps:
            continue  # OTP applications come from the Erlang installation, not plugins/
        app_file = apps[name] / "ebin" / f"{name}.app"
        text = re.sub(r"%[^\n]*", "", app_file.read_text())
        needed[name] = apps[name]
        for match in _APP_DEPS_RE.finditer(text):
            stack += [dep.strip().strip("'") for dep in match.group(1).split(",") if dep.strip()]
    return needed


class RabbitMQ(Service):
    """A private broker: ``RabbitMQ(tmp).start().url`` -> ``amqp://user:pass@127.0.0.1:port/%2F``."""

    kind: ClassVar[str] = "RabbitMQ"
    default_startup_timeout: ClassVar[float] = 120.0

    def __init__(self, base_dir: Path, *, startup_timeout: float | None = None, say: Say | None = None,
                 server_home: Path | None = None, minimal_code_path: bool = True) -> None:
        super().__init__(base_dir, startup_timeout=startup_timeout, say=say)
        self._server_home_arg = server_home
        self.minimal_code_path = minimal_code_path
        if "node_name" not in self._state:
            self._state["node_name"] = f"zstack-{self._secret('node_suffix', 4)}@localhost"
            self._save_state()
        self._secret("password")
        self._secret("cookie", 20)
        self._state.setdefault("username", f"zstack-{self._secret('user_suffix', 3)}")
        self._save_state()

    # -- public properties -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """AMQP port."""
        return self._port("amqp_port")

    @property
    def dist_port(self) -> int:
        """Erlang distribution port of the node."""
        return self._port("dist_port")

    @property
    def epmd_port(self) -> int:
        """Port of the instance's own epmd."""
        return self._port("epmd_port")

    @property
    def node_name(self) -> str:
        return self._state["node_name"]

    @property
    def username(self) -> str:
        return self._state["username"]


    @property
    def url(self) -> str:
        """AMQP URL of the default vhost ``/``."""
        return self.url_for("/")

    def url_for(self, vhost: str) -> str:
        """AMQP URL of ``vhost`` with the instance's credentials."""
        return f"amqp://{self.username}:{self.password}@{self.host}:{self.port}/{quote(vhost, safe='')}"


    @property
    def log_file(self) -> Path:
        """The broker's own log file."""
        return self.base_dir / "log" / f"{self.node_name}.log"

    @property
    def console_log(self) -> Path:
        """stdout/stderr of the server (the boot banner and early crashes)."""
        return self.base_dir / "log" / "console.log"

    # -- management --------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for rabbitmq-server/rabbitmqctl/erl_call aimed at this instance only."""
        base = self.base_dir
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("NOTIFY_SOCKET", "HOME")}
        env.update(
            HOME=str(base / "home"),
            LANG=os.environ.get("LANG") or "C.UTF-8",
            ERL_EPMD_ADDRESS=self.host,
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "etc" / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(base / "etc" / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "etc" / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "etc" / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(base / "etc" / "rabbitmq-env.conf"),
            RABBITMQ_MOTD_FILE=str(base / "etc" / "motd"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            # Keep distribution on loopback; never let erl start a (daemonized, unowned) epmd itself.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
        )
        runtime = base / "runtime"
        if (runtime / "sbin").is_dir():
            env["RABBITMQ_SCRIPTS_DIR"] = str(runtime / "sbin")
            env["RABBITMQ_PLUGINS_DIR"] = str(runtime / "plugins")
        return env

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this instance; returns stdout, raises on failure."""
        argv = [str(self._server_home() / "sbin" / "rabbitmqctl"), "-n", self.node_name, *args]
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ServiceError(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc.stdout

    def erl_eval(self, expr: str, timeout: float = 30.0) -> str:
        """Evaluate Erlang expressions on the node via ``erl_call`` (milliseconds, vs ~0.5s for rabbitmqctl).

        Returns the printed result of the last expression; raises ServiceError on an error.
        """
        erl_call = _find_erl_call()
        if erl_call is None:
            raise ServiceError("erl_call not found (it ships with erlang-base in /usr/lib/erlang/erts-*/bin)")
        expr = expr.strip()
        if not expr.endswith("."):
            expr += "."
        expr += "\n"  # erl_call wants the form terminated by ".<newline>"
        proc = subprocess.run([erl_call, "-sname", self.node_name, "-e"], input=expr, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        out = proc.stdout.strip()
        if proc.returncode != 0 or not out.startswith("{ok,"):
            raise ServiceError(f"erl_call on {self.node_name} failed ({proc.returncode}): {out} {proc.stderr}")
        return out[len("{ok,"):-1].strip()

    def add_vhost(self, name: str) -> str:
        """Create ``name`` (if absent), grant the instance user full rights on it, return its AMQP URL."""
        if not _VHOST_RE.match(name):
            raise ValueError(f"vhost names are limited to [A-Za-z0-9_.-]{{1,64}}: {name!r}")
        v, u, who = f'<<"{name}">>', f'<<"{self.username}">>', f'<<"{_ACTING_USER}">>'
        try:
            self.erl_eval(
                f"case rabbit_vhost:exists({v}) of true -> ok; false -> ok = rabbit_vhost:add({v}, {who}) end, "
                f'ok = rabbit_auth_backend_internal:set_permissions({u}, {v}, <<".*">>, <<".*">>, <<".*">>, {who})'
            )
        except ServiceError:  # internal API changed or no erl_call: use the (slower) CLI
            if name not in self.ctl("list_vhosts", "--quiet", "--no-table-headers").split():
                self.ctl("add_vhost", name)
            self.ctl("set_permissions", "-p", name, self.username, ".*", ".*", ".*")
        return self.url_for(name)

    def delete_vhost(self, name: str) -> None:
        """Delete ``name`` and everything in it (no error when it does not exist)."""
        if not _VHOST_RE.match(name):
            raise ValueError(f"invalid vhost name {name!r}")
        v, who = f'<<"{name}">>', f'<<"{_ACTING_USER}">>'
        try:
            self.erl_eval(f"case rabbit_vhost:exists({v}) of true -> rabbit_vhost:delete({v}, {who}); "
                          f"false -> ok end")
        except ServiceError:
            if name in self.ctl("list_vhosts", "--quiet", "--no-table-headers").split():
                self.ctl("delete_vhost", name)

    # -- Service hooks -----------------------------------------------------------------------------------

    def _port_names(self) -> tuple[str, ...]:
        return ("amqp_port", "dist_port", "epmd_port")

    def _server_home(self) -> Path:
        return find_server_home(self._server_home_arg)

    def _prepare(self) -> None:
        base = self.base_dir
        for sub in ("home", "mnesia", "log", "etc", "etc/conf.d"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(base / "home", 0o700)
        cookie = base / "home" / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(self._state["cookie"])
        self._write_private(base / "etc" / "rabbitmq.conf", "\n".join([
            f"listeners.tcp.1 = {self.host}:{self.port}",
            *([f"listeners.tcp.2 = {self.pod_network[0]}:{self.port}"] if self.pod_network else []),
            f"default_user = {self.username}",
            f"default_pass = {self.password}",
            "default_vhost = /",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "log.console = false",
            "log.file.level = info",
            "",
        ]))
        (base / "etc" / "enabled_plugins").write_text("[].\n")
        (base / "etc" / "rabbitmq-env.conf").write_text("# private instance: no overrides\n")
        if self.minimal_code_path:
            self._prepare_runtime()

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def _prepare_runtime(self) -> None:
        """A private RABBITMQ_HOME whose plugins/ links only the apps the broker needs (see module doc)."""
        home = self._server_home()
        runtime = self.base_dir / "runtime"
        if runtime.exists():
            shutil.rmtree(runtime)
        try:
            apps = needed_apps(home / "plugins")
        except OSError as err:
            self._say(f"RabbitMQ: cannot read the bundled .app files ({err}); using the full code path")
            return
        if "rabbit" not in apps or "rabbitmq_prelaunch" not in apps:
            return  # unexpected layout (e.g. .ez archives): fall back to the package's own plugins dir
        (runtime / "plugins").mkdir(parents=True)
        (runtime / "sbin").mkdir()
        (runtime / "sbin" / "rabbitmq-defaults").symlink_to(home / "sbin" / "rabbitmq-defaults")
        if (home / "escript").exists():
            (runtime / "escript").symlink_to(home / "escript")
        for app_dir in apps.values():
            (runtime / "plugins" / app_dir.name).symlink_to(app_dir)

    def _launch(self) -> None:
        env = self.env()
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        self._spawn("epmd", [epmd, "-port", str(self.epmd_port), "-address", self.host],
                    self.base_dir / "log" / "epmd.log", env=env)
        self._wait_epmd()
        # RUNNING_UNDER_SYSTEMD makes the script exec erl (no signal-forwarding shell in between), so the
        # pid we hold is beam.smp itself and SIGTERM triggers RabbitMQ's own graceful shutdown.
        env["RUNNING_UNDER_SYSTEMD"] = "true"
        self._spawn("rabbitmq-server", [str(self._server_home() / "sbin" / "rabbitmq-server")],
                    self.console_log, env=env)

    def _wait_epmd(self) -> None:
        child = self._children[-1]
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if not child.alive():
                raise ServiceError(self._failure(f"epmd exited with code {child.popen.returncode}"))
            try:
                socket.create_connection((self.host, self.epmd_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        raise ServiceError(self._failure(f"epmd did not listen on {self.host}:{self.epmd_port} within 10s"))

    def _probe(self) -> bool:
        # A cheap TCP check first: pika logs every refused attempt at ERROR level.
        socket.create_connection((self.host, self.port), timeout=1.0).close()
        import pika

        params = pika.URLParameters(self.url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = 5
        conn = pika.BlockingConnection(params)
        conn.close()
        return True

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGTERM  # handled by rabbit_prelaunch_sighandler: a graceful stop (~1s)

    def _log_files(self) -> list[Path]:
        epmd_log = self.base_dir / "log" / "epmd.log"
        has_epmd_output = epmd_log.exists() and "\n" in epmd_log.read_text().strip()  # more than our marker
        return [self.console_log, self.log_file, *([epmd_log] if has_epmd_output else [])]

    def _hint(self) -> str:
        return (f"Check the logs below ({self.log_file}, {self.console_log}). Common causes: one of the ports "
                f"{self._state.get('amqp_port')}/{self._state.get('dist_port')}/{self._state.get('epmd_port')} "
                f"taken meanwhile, another broker using {self.base_dir / 'mnesia'}, a broken Erlang install "
                f"(try `erl -noshell -eval 'halt().'`), or a full disk.")
