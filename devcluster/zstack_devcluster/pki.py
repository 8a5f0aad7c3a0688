"""Certificates and keys for the devcluster, made with the ``openssl`` command line (ECDSA P-256).

Files land in ``DIR/pki``; existing files are kept, so a second ``up`` reuses the same CA.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster.errors import DevclusterError

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service's ClusterIP: first address of SERVICE_CIDR
DAYS = "3650"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"]
_SERVER_SANS = ",".join(
    [
        "IP:127.0.0.1",
        "DNS:localhost",
        f"IP:{SERVICE_IP}",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ]
)


@dataclass(frozen=True)
class ClientCert:
    """Subject of one client certificate (``O`` groups, ``CN`` user name)."""

    file: str
    cn: str
    org: str = ""


FRONT_PROXY_CLIENT = "front-proxy-client"  # request-header (aggregation) client, signed by its own CA
CLIENTS = (
    ClientCert("admin", "kubernetes-admin", "system:masters"),
    ClientCert("controller-manager", "system:kube-controller-manager"),
    ClientCert("scheduler", "system:kube-scheduler"),
    # The container node's components, each as itself (containernode/config.py IDENTITIES): the kubelet as
    # its Node (the Node authorizer and NodeRestriction confine it to its own pods' objects), kube-proxy as
    # the user the built-in system:node-proxier binding names, and two users that containernode's own
    # ClusterRoles let read what they watch.
    ClientCert("node", "system:node:devcluster", "system:nodes"),  # layout.NODE_NAME
    ClientCert("kube-proxy", "system:kube-proxy"),
    ClientCert("coredns", "zstack-dev:coredns"),
    ClientCert("kube-router", "zstack-dev:kube-router"),
)


@dataclass(frozen=True)
class Pki:
    """Paths of every file in ``DIR/pki``."""

    root: Path

    @property
    def ca_crt(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def front_proxy_ca_crt(self) -> Path:
        return self.root / "front-proxy-ca.crt"

    @property
    def front_proxy_ca_key(self) -> Path:
        return self.root / "front-proxy-ca.key"

    @property
    def server_crt(self) -> Path:
        return self.root / "apiserver.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def client_crt(self, name: str) -> Path:
        return self.root / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.root / f"{name}.key"


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DevclusterError("`openssl` is not on PATH; install it (Debian: apt-get install openssl)")
    proc = subprocess.run([openssl, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DevclusterError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _make_ca(crt: Path, key: Path, cn: str) -> None:
    if crt.exists() and key.exists():
        return
    _openssl(
        "req", "-x509", *_EC, "-keyout", str(key), "-out", str(crt), "-days", DAYS, "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )


def _issue(ca: tuple[Path, Path], crt: Path, key: Path, subject: str, *extensions: str) -> None:
    """Issue a leaf certificate signed by ``ca`` (OpenSSL 3 ``req -x509 -CA``), unless it exists."""
    if crt.exists() and key.exists():
        return
    ext_args = [arg for ext in extensions for arg in ("-addext", ext)]
    _openssl(
        "req", "-x509", *_EC, "-keyout", str(key), "-out", str(crt), "-days", DAYS, "-subj", subject,
        "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment", *ext_args,
    )


def ensure_pki(root: Path) -> Pki:
    """Create whatever of the CAs, serving cert, client certs and SA keys is missing under ``root``."""
    pki = Pki(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    _make_ca(pki.ca_crt, pki.ca_key, "devcluster-ca")
    _make_ca(pki.front_proxy_ca_crt, pki.front_proxy_ca_key, "devcluster-front-proxy-ca")
    ca = (pki.ca_crt, pki.ca_key)
    _issue(ca, pki.server_crt, pki.server_key, "/CN=kube-apiserver",
           f"subjectAltName={_SERVER_SANS}", "extendedKeyUsage=serverAuth")
    for client in CLIENTS:
        subject = (f"/O={client.org}" if client.org else "") + f"/CN={client.cn}"
        _issue(ca, pki.client_crt(client.file), pki.client_key(client.file), subject, "extendedKeyUsage=clientAuth")
    _issue((pki.front_proxy_ca_crt, pki.front_proxy_ca_key), pki.client_crt(FRONT_PROXY_CLIENT),
           pki.client_key(FRONT_PROXY_CLIENT), f"/CN={FRONT_PROXY_CLIENT}", "extendedKeyUsage=clientAuth")
    if not (pki.sa_key.exists() and pki.sa_pub.exists()):
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(pki.sa_key))
        _openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    return pki
