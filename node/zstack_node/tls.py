"""HTTPS on the MN's port: an SSLContext from PEM files, loaded again when the files change.

In Kubernetes the certificate and key are a mounted Secret (`tls.crt`, `tls.key`); the kubelet updates it
by swapping a `..data` symlink, so the files are compared by content every few seconds, not by an event.
A changed pair is checked first (each PEM parses, the key matches the certificate, OpenSSL accepts both on
a scratch context) and only then loaded into the live context, from a snapshot of the bytes it checked:
new handshakes get the new certificate, open connections keep theirs. A pair that fails any check (half
written, mismatched) is logged once and the previous certificate stays served. OpenSSL keeps one certificate
per key type in a context, so a pair whose key is of another type (RSA after ECDSA) is refused the same way:
changing the key type takes a restart.

A problem at start is a `ConfigError` naming the flag and the file: the MN stops before it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from zstack_node import metrics
from zstack_node.errors import ConfigError

log = logging.getLogger(__name__)

CERT_FLAG = "--tls-cert-file / ZSTACK_TLS_CERT_FILE"
KEY_FLAG = "--tls-key-file / ZSTACK_TLS_KEY_FILE"
CHECK_INTERVAL = 2.0  # seconds between two looks at the files
RELOAD_RESULTS = ("success", "error")
_PUBLIC = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_KEY_TYPES = ((rsa.RSAPrivateKey, "RSA"), (ec.EllipticCurvePrivateKey, "ECDSA"), (ed25519.Ed25519PrivateKey, "Ed25519"),
              (ed448.Ed448PrivateKey, "Ed448"), (dsa.DSAPrivateKey, "DSA"))


class CertificatePair:
    """A certificate (with its chain) and its key, checked: the bytes read and what they hold."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> None:
        """Check the pair read from the paths; raise ConfigError naming the flag and file at fault."""
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.cert_path, self.key_path = cert_path, key_path
        self.digest = _digest(cert_pem, key_pem)
        try:
            self.certificate = x509.load_pem_x509_certificates(cert_pem)[0]  # the leaf comes first
        except ValueError:
            raise ConfigError(f"{CERT_FLAG}: {cert_path} holds no PEM certificate") from None
        key = _private_key(key_pem, key_path)
        if key.public_key().public_bytes(*_PUBLIC) != self.certificate.public_key().public_bytes(*_PUBLIC):
            raise ConfigError(f"{KEY_FLAG}: the key in {key_path} does not match the certificate in {cert_path} "
                              f"({CERT_FLAG})")
        self.key_type = next((name for cls, name in _KEY_TYPES if isinstance(key, cls)), type(key).__name__)
        with self.files() as (cert_file, key_file):
            try:  # what OpenSSL refuses beyond parsing (a key too small, a weak signature) fails here
                server_context().load_cert_chain(cert_file, key_file)
            except ssl.SSLError as exc:
                raise ConfigError(f"{CERT_FLAG} and {KEY_FLAG}: OpenSSL refuses {cert_path} with {key_path}: "
                                  f"{exc.reason or exc}") from None

    @classmethod
    def read(cls, cert_path: Path, key_path: Path) -> CertificatePair:
        """Read both files and check them."""
        return cls(_read(cert_path, CERT_FLAG), _read(key_path, KEY_FLAG), cert_path, key_path)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string() or "no subject"

    @contextlib.contextmanager
    def files(self) -> Iterator[tuple[str, str]]:
        """Paths that hold exactly the bytes checked (OpenSSL loads from paths): files in memory where the
        OS has them (a pod's root filesystem is read-only), else in a private temporary directory."""
        if hasattr(os, "memfd_create"):
            fds = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("tls.crt", "tls.key")]
            try:
                for fd, data in zip(fds, (self.cert_pem, self.key_pem), strict=True):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
            finally:
                for fd in fds:
                    os.close(fd)
        else:
            with tempfile.TemporaryDirectory(prefix="zstack-tls-") as directory:
                cert, key = Path(directory, "tls.crt"), Path(directory, "tls.key")
                cert.write_bytes(self.cert_pem)
                key.write_bytes(self.key_pem)
                yield str(cert), str(key)


class ServerTls:
    """The SSLContext of the HTTPS port, with the pair in `cert_file` and `key_file` loaded into it.

    `check()`, run by `watch()` every CHECK_INTERVAL seconds, loads a changed pair into the same context.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        """Load the pair; raise ConfigError naming the flag and file if it cannot be served."""
        self.cert_path, self.key_path = Path(cert_file), Path(key_file)
        self.context = server_context()
        self._served = CertificatePair.read(self.cert_path, self.key_path)
        self._refused: bytes | str | None = None  # the digest (or read error) of the last pair refused
        self._load(self._served)
        metrics.export_tls()
        for result in RELOAD_RESULTS:
            metrics.TLS_RELOADS.labels(result)
        log.info("HTTPS with the certificate in %s (%s), valid until %s", self.cert_path, self._served.subject,
                 self._served.not_after.isoformat())

    def check(self) -> bool:
        """Load the files again if their content changed; True when a new pair is now served.

        A pair that cannot be served leaves the served one in place and logs a warning naming the file, once
        per bad pair; a bad pair never raises."""
        try:
            cert_pem, key_pem = _read(self.cert_path, CERT_FLAG), _read(self.key_path, KEY_FLAG)
        except ConfigError as exc:  # removed or emptied in the middle of an update
            self._refuse(str(exc), str(exc))
            return False
        digest = _digest(cert_pem, key_pem)
        if digest == self._served.digest:
            self._refused = None
            return False
        if digest == self._refused:
            return False
        try:
            pair = CertificatePair(cert_pem, key_pem, self.cert_path, self.key_path)
        except ConfigError as exc:
            self._refuse(digest, str(exc))
            return False
        if pair.key_type != self._served.key_type:  # OpenSSL keeps one certificate per key type: both would stay
            self._refuse(digest, f"{KEY_FLAG}: the key in {self.key_path} is {pair.key_type}, the served one "
                                 f"{self._served.key_type}; a key of another type needs a restart of the MN")
            return False
        self._load(pair)
        self._refused = None
        metrics.TLS_RELOADS.labels("success").inc()
        log.info("reloaded the certificate in %s (%s), valid until %s", self.cert_path, pair.subject,
                 pair.not_after.isoformat())
        return True

    async def watch(self, interval: float = CHECK_INTERVAL) -> None:
        """Check the files every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # a surprise must not end the watch: the served pair stays
                log.exception("checking the TLS files %s and %s failed", self.cert_path, self.key_path)

    def _load(self, pair: CertificatePair) -> None:
        with pair.files() as (cert_file, key_file):
            self.context.load_cert_chain(cert_file, key_file)
        self._served = pair
        metrics.TLS_CERT_EXPIRY.set(pair.not_after.timestamp())
        if pair.not_after <= datetime.now(UTC):
            log.warning("the certificate in %s expired at %s: clients will refuse it", pair.cert_path,
                        pair.not_after.isoformat())

    def _refuse(self, what: bytes | str, problem: str) -> None:
        if what == self._refused:
            return
        self._refused = what
        metrics.TLS_RELOADS.labels("error").inc()
        log.warning("cannot reload TLS: %s; still serving the previous certificate (%s, valid until %s)", problem,
                    self._served.subject, self._served.not_after.isoformat())


def server_context() -> ssl.SSLContext:
    """A server-side context speaking TLS 1.2 or later, without a certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_files(cert_file: str | None, key_file: str | None) -> None:
    """Raise ConfigError unless both files or neither are given, and a given pair can be served."""
    if bool(cert_file) != bool(key_file):
        raise ConfigError(f"{CERT_FLAG} and {KEY_FLAG} go together: pass both for HTTPS, or neither for plain "
                          "HTTP")
    if cert_file and key_file:
        CertificatePair.read(Path(cert_file), Path(key_file))


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ConfigError(f"{flag}: {path} is empty")
    return data


def _digest(cert_pem: bytes, key_pem: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(cert_pem).digest() + key_pem).digest()


def _private_key(pem: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # it needs a password
        raise ConfigError(f"{KEY_FLAG}: the key in {path} is encrypted; the MN needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{KEY_FLAG}: {path} holds no usable PEM private key") from None
