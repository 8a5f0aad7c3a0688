"""The MN API's certificate: a private CA and a serving certificate per ZStackCluster, made once.

The Secret `<cluster>-api-tls` has cert-manager's layout (type kubernetes.io/tls: tls.crt, tls.key, ca.crt),
so `spec.api.tls.secretName` may name a cert-manager Certificate's Secret instead. The CA's key is thrown
away once it has signed: nobody, the operator included, can issue another certificate this cluster trusts.
The CA certificate, which is public, also goes to the ConfigMap `<cluster>-api-ca`: the operator verifies
the MNs with it (it may create Secrets but never read them), and clients may read it without Secret rights.

To rotate, delete the Secret: the next reconcile makes a new CA and certificate, the kubelet updates the
mounted files, and the MNs serve the new certificate without a restart.
"""

from __future__ import annotations

import base64
import datetime
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zstack_operator.cluster import Cluster

VALIDITY = datetime.timedelta(days=3650)  # no renewal without the CA key: rotation is a Secret delete
CLOCK_SKEW = datetime.timedelta(minutes=5)
CA_KEY = "ca.crt"
MOUNT_DIR = "/var/run/zstack/api-tls"  # where MN pods mount the Secret
VOLUME = "api-tls"


@dataclass(frozen=True)
class Issued:
    """A new CA certificate and the serving certificate and key it signed, as PEM."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def enabled(cluster: Cluster) -> bool:
    """HTTPS unless spec.api.tls.enabled is false (an explicit opt-out)."""
    return cluster.section("api", "tls").get("enabled", True) is not False


def secret_name(cluster: Cluster) -> str:
    """The Secret the MNs mount: the user's (spec.api.tls.secretName) or the generated one."""
    return cluster.section("api", "tls").get("secretName") or cluster.child("api-tls")


def generated(cluster: Cluster) -> bool:
    return enabled(cluster) and not cluster.section("api", "tls").get("secretName")


def ca_config_map_name(cluster: Cluster) -> str:
    return cluster.child("api-ca")


def dns_names(cluster: Cluster) -> list[str]:
    """The API Service, short and qualified; every MN pod by the headless Service (`<pod>.<cluster>-mn.<ns>.svc`);
    and localhost, for `kubectl port-forward`."""
    api, ns = cluster.child("api"), cluster.namespace
    pods = f"*.{cluster.mn}.{ns}"
    return ["localhost", api, f"{api}.{ns}", f"{api}.{ns}.svc", f"{api}.{ns}.svc.cluster.local",
            pods, f"{pods}.svc", f"{pods}.svc.cluster.local"]


def issue(cluster: Cluster, now: datetime.datetime | None = None) -> Issued:
    """A fresh CA (key discarded) and a serving certificate for `dns_names(cluster)`."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster.namespace}/{cluster.name} API CA")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), now)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cluster.child("api"))])
    san = [x509.DNSName(name) for name in dns_names(cluster)]
    cert = (_builder(subject, ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(ca.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.PEM), key_pem)


def secret(cluster: Cluster, issued: Issued) -> dict[str, Any]:
    """`<cluster>-api-tls`, created once (never overwritten, like every generated Secret)."""
    data = {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem, CA_KEY: issued.ca_pem}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": cluster.metadata(cluster.child("api-tls"), "mn"),
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def ca_config_map(cluster: Cluster, issued: Issued) -> dict[str, Any]:
    """`<cluster>-api-ca`: the public CA certificate, written when its Secret was created."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": cluster.metadata(ca_config_map_name(cluster), "mn"),
            "data": {CA_KEY: issued.ca_pem.decode()}}


def client_context(ca_pem: str) -> ssl.SSLContext:
    """Verifies an MN against its cluster's CA. Hostnames are not checked: the operator dials pod IPs, and a
    CA that signed one certificate only, for this cluster's MNs, already proves who answers."""
    context = ssl.create_default_context(cadata=ca_pem)
    context.check_hostname = False
    return context


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any, now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
