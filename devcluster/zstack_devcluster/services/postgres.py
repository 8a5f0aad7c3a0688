"""A private PostgreSQL server (Debian's binaries) with its data directory under ``base_dir``.

First start: ``initdb`` (superuser with a random password, scram-sha-256 everywhere, no fsync), then a
login role with a random password and CREATEDB, owning one database. The server listens on a free port
of 127.0.0.1 plus a unix socket in ``base_dir/run``; durability is traded for speed (fsync,
synchronous_commit and full_page_writes off) - this is a test server.

PostgreSQL refuses to run as root. As root we run it as the ``postgres`` system user (``run_as``) via
setpriv. pytest's temporary directories live under ``/tmp/pytest-of-root`` (mode 0700), which that user
cannot traverse; in that case (and only then) the server gets the single capability
CAP_DAC_READ_SEARCH (read/search, not write) so it can reach its own directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from zstack_devcluster.services.base import Say, Service, ServiceError

_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"


def find_bin_dir(explicit: Path | None = None) -> Path:
    """Directory holding ``postgres`` and ``initdb`` (highest installed major version)."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if env := os.environ.get("ZSTACK_PG_BIN"):
        candidates.append(Path(env))
    for name in ("pg_ctl", "initdb", "postgres"):
        if found := shutil.which(name):
            candidates.append(Path(found).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(re.sub(r"\D", "", p) or 0), reverse=True)]
    for bin_dir in candidates:
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return bin_dir
    raise ServiceError(
        "PostgreSQL server binaries not found (no postgres+initdb in /usr/lib/postgresql/*/bin or on PATH). "
        "Install the Debian package (apt-get install postgresql) or set ZSTACK_PG_BIN."
    )


def _check_ident(name: str) -> str:
    if not _IDENT_RE.match(name):
        raise ValueError(f"identifiers are limited to [a-z_][a-z0-9_]{{0,62}}: {name!r}")
    return name


class PostgreSQL(Service):
    """A private server: ``PostgreSQL(tmp).start().url`` -> ``postgresql+psycopg2://user:pass@127.0.0.1:port/db``."""

    kind: ClassVar[str] = "PostgreSQL"
    default_startup_timeout: ClassVar[float] = 60.0

    def __init__(self, base_dir: Path, *, startup_timeout: float | None = None, say: Say | None = None,
                 bin_dir: Path | None = None, run_as: str | None = None, database: str = "zstack",
                 max_connections: int = 200) -> None:
        super().__init__(base_dir, startup_timeout=startup_timeout, say=say)
        self._bin_dir_arg = bin_dir
        self.max_connections = max_connections
        self.run_as = run_as or ("postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)
        self._state.setdefault("database", _check_ident(database))
        self._state.setdefault("username", f"zstack_{self._secret('user_suffix', 3)}")
        self._state.setdefault("admin_username", "zstack_admin")
        self._secret("password")
        self._secret("admin_password")
        self._save_state()

    # -- public properties -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port("port")

    @property
    def username(self) -> str:
        """The login role (CREATEDB, not superuser) that owns :attr:`database`."""
        return self._state["username"]


    @property
    def database(self) -> str:
        return self._state["database"]

    @property
    def admin_username(self) -> str:
        """The superuser created by initdb."""
        return self._state["admin_username"]

    @property
    def url(self) -> str:
        """SQLAlchemy URL of :attr:`database` as :attr:`username`."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` as :attr:`username`."""
        return (f"postgresql+psycopg2://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
                f"@{self.host}:{self.port}/{quote(database, safe='')}")


    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    # -- SQL helpers -------------------------------------------------------------------------------------

    def connect(self, database: str | None = None, *, admin: bool = False) -> Any:
        """A new psycopg2 connection (autocommit) to ``database`` (default :attr:`database`)."""
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, connect_timeout=5,
            dbname=database or (self.database if not admin else "postgres"),
            user=self.admin_username if admin else self.username,
            password=self._state["admin_password"] if admin else self.password,
        )
        conn.autocommit = True
        return conn

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database owned by :attr:`username`; returns its name (random when not given)."""
        name = _check_ident(name or f"test_{secrets.token_hex(6)}")
        self._admin_execute(f'CREATE DATABASE "{name}" OWNER "{self.username}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting its clients (no error when it does not exist)."""
        self._admin_execute(f'DROP DATABASE IF EXISTS "{_check_ident(name)}" WITH (FORCE)')

    def _admin_execute(self, sql: str) -> None:
        conn = self.connect(admin=True)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    # -- running as another user -------------------------------------------------------------------------

    def _as_server_user(self, argv: list[str]) -> list[str]:
        """Prefix ``argv`` so it runs as :attr:`run_as` (nothing to do when that is us)."""
        if os.geteuid() != 0:
            return argv
        if self._state.get("needs_read_search") is None:
            self._state["needs_read_search"] = not self._user_can_reach(self.base_dir)
            self._save_state()
        pw = self._server_pw()
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        if self._state["needs_read_search"]:
            prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        return [*prefix, "--", *argv]

    def _server_pw(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            raise ServiceError(
                f"PostgreSQL refuses to run as root and the user {self.run_as!r} does not exist: create a "
                f"system user (useradd --system postgres) or pass run_as= an existing unprivileged user."
            ) from None

    def _user_can_reach(self, path: Path) -> bool:
        pw = self._server_pw()
        probe = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--",
                 "/bin/sh", "-c", 'cd "$1"', "sh", str(path)]
        return subprocess.run(probe, capture_output=True).returncode == 0

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = self._server_pw()
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- Service hooks -----------------------------------------------------------------------------------

    def _port_names(self) -> tuple[str, ...]:
        return ("port",)

    def _bin(self, name: str) -> str:
        return str(find_bin_dir(self._bin_dir_arg) / name)

    def _prepare(self) -> None:
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._own(self.socket_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        sock = str(self.socket_dir) if len(str(self.socket_dir)) < _SOCKET_PATH_MAX else ""
        if not sock:
            self._say(f"PostgreSQL: {self.socket_dir} is too long for a unix socket; TCP only")
        self._write_pod_clients()
        listen = ",".join([self.host, *([self.pod_network[0]] if self.pod_network else [])])
        conf = "\n".join([
            f"listen_addresses = '{listen}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{sock}'",
            f"max_connections = {self.max_connections}",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "logging_collector = off",
            "log_destination = 'stderr'",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "",
        ])
        # Our settings go to their own file, included last, so every (re)start uses them.
        devconf = self.data_dir / "devcluster.conf"
        devconf.write_text(conf)
        self._own(devconf)
        main = self.data_dir / "postgresql.conf"
        if "include_if_exists = 'devcluster.conf'" not in main.read_text():
            with open(main, "a") as fh:
                fh.write("\ninclude_if_exists = 'devcluster.conf'\n")

    def _write_pod_clients(self) -> None:
        """pg_hba.conf: initdb's loopback lines, plus the pods' network when the server serves pods."""
        hba = self.data_dir / "pg_hba.conf"
        marker = "# devcluster: pods\n"
        lines = hba.read_text().split(marker)[0]
        if self.pod_network:
            lines += f"{marker}host all all {self.pod_network[1]} scram-sha-256\n"
        hba.write_text(lines)

    def _initdb(self) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made directory from an interrupted initdb
        self.data_dir.mkdir(mode=0o700)
        self._own(self.data_dir)
        pwfile = self.socket_dir / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._state["admin_password"] + "\n")
        self._own(pwfile)
        argv = self._as_server_user([
            self._bin("initdb"), "-D", str(self.data_dir), "-U", self.admin_username, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ])
        self._say(f"PostgreSQL: initdb {self.data_dir}")
        try:
            with open(self.log_file, "ab") as log_fh:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                      cwd=self.base_dir, timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise ServiceError(self._failure(f"initdb exited with code {proc.returncode}"))

    def _launch(self) -> None:
        argv = self._as_server_user([self._bin("postgres"), "-D", str(self.data_dir)])
        self._spawn("postgres", argv, self.log_file)

    def _probe(self) -> bool:
        conn = self.connect(admin=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone() == (1,)
        finally:
            conn.close()

    def _after_ready(self) -> None:
        """Create the login role and its database if they do not exist yet (idempotent)."""
        conn = self.connect(admin=True)
        try:
            with conn.cursor() as cur:
                # Never let the server log a failing statement here: it would carry the password.
                cur.execute("SET log_min_error_statement = panic")
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.username,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE ROLE "{self.username}" LOGIN CREATEDB PASSWORD %s', (self.password,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.username}"')
        finally:
            conn.close()

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGINT  # "fast" shutdown: disconnect clients, checkpoint, exit

    def _log_files(self) -> list[Path]:
        return [self.log_file]

    def _hint(self) -> str:
        return (f"Check {self.log_file}. Common causes: port {self._state.get('port')} taken meanwhile, another "
                f"postmaster using {self.data_dir} (postmaster.pid), {self.run_as!r} unable to reach "
                f"{self.base_dir}, or not enough shared memory.")
