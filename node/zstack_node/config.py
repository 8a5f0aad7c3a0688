"""Management node settings: one validated, immutable object built once from flags and env vars.

Every default lives here, on the dataclass: the CLI's flags and the operator's MN environment read them
from it. `default(name)` gives one.
"""

from __future__ import annotations

import re
import socket
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zstack_node import tls
from zstack_node.cloud.settings import CloudSettings
from zstack_node.cloud.tokens import ApiTokens
from zstack_node.errors import ConfigError
from zstack_node.ring import DEFAULT_VNODES

_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def _where(name: str) -> str:
    flag = "--" + name.replace("_", "-")
    return f"{flag} / ZSTACK_{name.upper()}"


MAX_SECONDS = 86400.0  # the longest duration a setting may have: a day


@dataclass(frozen=True)
class Settings:
    """Everything one MN needs to run. Build it with `Settings(...)` and call `validate()`."""

    broker_url: str
    database_url: str
    http_bind: str = "0.0.0.0"
    http_port: int = 8080
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 4.0
    lease_duration: float = 5.0
    ring_vnodes: int = DEFAULT_VNODES
    api_token: str | None = None
    api_token_file: str | None = None  # one token per line, two during a rotation; read again when it changes
    tls_cert_file: str | None = None  # PEM certificate (and chain) of the HTTPS port; with tls_key_file or neither
    tls_key_file: str | None = None  # its PEM private key; both files are read again when they change
    cluster: str = "default"
    hostname: str = field(default_factory=socket.gethostname)
    services: tuple[str, ...] = ()
    advertise_address: str | None = None
    call_timeout: float = 10.0
    kubernetes: str = "auto"  # Lease membership: auto (on when pod_name is set), on, off
    pod_name: str | None = None  # the downward API's metadata.name: also the Lease name
    pod_namespace: str | None = None
    cloud: CloudSettings = field(default_factory=CloudSettings)  # the cloud services' tuning (ZSTACK_SIM_* ...)

    @property
    def leases_enabled(self) -> bool:
        """Lease membership is on in a pod (POD_NAME set) unless forced on or off."""
        return self.kubernetes == "on" or (self.kubernetes == "auto" and bool(self.pod_name))

    @property
    def lease_name(self) -> str:
        return self.pod_name or self.hostname

    def validate(self) -> Settings:
        """Raise ConfigError naming the first bad setting; return self when all are good."""
        _check_url("broker_url", self.broker_url, ("amqp", "amqps"), "amqp://user:pass@host:5672/%2F")
        _check_url(
            "database_url",
            self.database_url,
            ("postgresql", "postgresql+psycopg2", "postgres"),
            "postgresql://user:pass@host:5432/zstack",
        )
        if self.api_token_file:
            ApiTokens(path=self.api_token_file)  # raises ConfigError naming the flag if it cannot be used
        tls.check_files(self.tls_cert_file, self.tls_key_file)  # both or neither, and a pair that can be served
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"{_where('http_port')}: {self.http_port} is not a TCP port (0-65535)")
        for name in ("heartbeat_interval", "heartbeat_timeout", "lease_duration", "call_timeout"):
            value = getattr(self, name)
            if not 0 < value <= MAX_SECONDS:  # also refuses nan and inf, which float() accepts
                raise ConfigError(f"{_where(name)}: must be a positive number of seconds up to {MAX_SECONDS:g}, "
                                  f"got {value!r}")
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"{_where('heartbeat_timeout')}: {self.heartbeat_timeout}s must be at least twice "
                f"{_where('heartbeat_interval')} ({self.heartbeat_interval}s), or one late heartbeat "
                "evicts a healthy MN"
            )
        if not 1 <= self.ring_vnodes <= 100_000:
            raise ConfigError(f"{_where('ring_vnodes')}: must be between 1 and 100000, got {self.ring_vnodes}")
        if not self.cluster:
            raise ConfigError(f"{_where('cluster')}: must not be empty")
        if self.kubernetes not in ("auto", "on", "off"):
            raise ConfigError(f"{_where('kubernetes')}: must be auto, on or off, got {self.kubernetes!r}")
        if self.leases_enabled:
            self._validate_lease()
        self.cloud.validate()
        return self

    def _validate_lease(self) -> None:
        # A renewal that times out once and succeeds on its retry commits up to interval + 2 call
        # timeouts after the previous one; a healthy MN's Lease must outlast that.
        slowest = self.heartbeat_interval + 2 * call_timeout(self.lease_duration)
        if self.lease_duration < 2 * self.heartbeat_interval or self.lease_duration <= slowest:
            raise ConfigError(
                f"{_where('lease_duration')}: {self.lease_duration}s must be at least twice "
                f"{_where('heartbeat_interval')} ({self.heartbeat_interval}s), the renewal interval, and longer "
                f"than {slowest:g}s (the interval plus a renewal's timeout and retry), or one late renewal "
                "expires a healthy MN's Lease"
            )
        if not _DNS_SUBDOMAIN.fullmatch(self.lease_name):
            raise ConfigError(
                f"--pod-name / POD_NAME: {self.lease_name!r} is not a valid Lease name (lower-case letters, "
                "digits, '-' and '.', at most 253 characters)"
            )
        if not _LABEL_VALUE.fullmatch(self.cluster):
            raise ConfigError(f"{_where('cluster')}: {self.cluster!r} is not a valid Kubernetes label value")

    @property
    def database_url_for_sqlalchemy(self) -> str:
        """SQLAlchemy wants the driver spelled out; users may write postgres:// or postgresql://."""
        scheme, rest = self.database_url.split("://", 1)
        return f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else self.database_url


def call_timeout(lease_duration: float) -> float:
    """Per-call deadline: short enough that a hung call is noticed well within one Lease duration."""
    return min(2.0, max(0.5, lease_duration / 4))


def call_limit(timeout: float) -> float:
    """The longest one renewal attempt takes while the process runs: a hung call and its one retry
    (zstack_kube.login), plus a second of slack for the quick calls around it. Longer means it stood still."""
    return 2 * timeout + 1.0


def default(name: str) -> Any:
    """The default of one setting (no instance needed: the URLs have none)."""
    spec = Settings.__dataclass_fields__[name]
    return spec.default_factory() if spec.default is MISSING else spec.default  # type: ignore[misc]


def url_setting(name: str, value: str | None, path: str | None) -> str:
    """A URL given directly or in a file (`--<name>-file`, in Kubernetes a mounted Secret): exactly one.

    The file is read once: a new password means a new pod, as the pools were opened with the old one."""
    flag = "--" + name.replace("_", "-")
    names = f"{flag} / ZSTACK_{name.upper()} or {flag}-file / ZSTACK_{name.upper()}_FILE"
    if bool(value) == bool(path):
        raise ConfigError(f"{names}: pass exactly one of them" if value else f"{names} is required")
    if value:
        return value
    resolved = Path(path)
    try:
        text = resolved.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag}-file / ZSTACK_{name.upper()}_FILE: cannot read {resolved}: "
                          f"{exc.strerror or exc}") from None
    if not text or "\n" in text:
        raise ConfigError(f"{flag}-file / ZSTACK_{name.upper()}_FILE: {resolved} must hold one URL on one line")
    return text


def _check_url(name: str, url: str, schemes: tuple[str, ...], example: str) -> None:
    if not url:
        raise ConfigError(f"{_where(name)}: is required, for example {example}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{_where(name)}: {redact(url)} is not a valid URL ({exc})") from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{_where(name)}: scheme {parts.scheme!r} in {redact(url)} is not one of {', '.join(schemes)}; "
            f"for example {example}"
        )
    if not parts.hostname:
        raise ConfigError(f"{_where(name)}: {redact(url)} has no host; for example {example}")
    if port == 0:
        raise ConfigError(f"{_where(name)}: {redact(url)} has port 0")


def redact(url: str) -> str:
    """Hide the password of a URL so that it can be logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
