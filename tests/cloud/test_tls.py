"""HTTPS on the MN's port: the TLS files are checked at start (naming the flag and file), served with TLS 1.2
or later, and loaded again in the same process when a Secret volume swaps them; a bad pair keeps the old one.

Certificates are made here with `cryptography` (tests/fixtures/tls.py); every handshake is real."""

from __future__ import annotations

import datetime
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from tests.cloud.conftest import TOKEN, Api, CloudCluster
from tests.fixtures.tls import Issued, SecretVolume, issue, make_ca, served_certificate
from zstack_cli.cli import main as cli_main
from zstack_devcluster.localnodes import LocalNode, wait_until
from zstack_node.cli import main as node_main
from zstack_node.errors import ConfigError
from zstack_node.tls import CERT_FLAG, KEY_FLAG, ServerTls, check_files

NODE_ENV = {"ZSTACK_BROKER_URL": "amqp://u:p@127.0.0.1:5672/%2F",
            "ZSTACK_DATABASE_URL": "postgresql://u:p@127.0.0.1/zstack"}


def handshake(server: ssl.SSLContext, ca: Path, host: str = "localhost") -> bytes:
    """A whole TLS handshake, in memory, between `server` and a client trusting `ca`: the DER certificate served."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=str(ca)).wrap_bio(to_client, client_out, server_hostname=host)
    peer = server.wrap_bio(to_server, server_out, server_side=True)
    for _ in range(10):
        done = 0
        for end in (client, peer):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if done == 2:
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.fixture
def ca(tmp_path: Path) -> Issued:
    return make_ca(tmp_path / "ca")


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path / "api-tls")


def serve_from(volume: SecretVolume) -> ServerTls:
    return ServerTls(str(volume.path("tls.crt")), str(volume.path("tls.key")))


# -- the context, reloaded in place ------------------------------------------------------------------------


def test_a_swapped_secret_is_loaded_into_the_same_context(ca: Issued, volume: SecretVolume, tmp_path: Path) -> None:
    first = issue(ca, tmp_path / "first")
    volume.publish_pair(first, ca)
    tls = serve_from(volume)
    context = tls.context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert handshake(context, ca.cert_path) == first.der
    assert not tls.check()  # nothing changed
    new_ca = make_ca(tmp_path / "new-ca")
    second = issue(new_ca, tmp_path / "second")
    volume.publish_pair(second, new_ca)
    assert tls.check() and tls.context is context
    assert handshake(context, new_ca.cert_path) == second.der
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, ca.cert_path)


@pytest.mark.parametrize("broken", ["half-written certificate", "key of another certificate", "missing key",
                                    "empty certificate", "key of another type"])
def test_a_bad_pair_during_a_rotation_keeps_the_served_certificate(
        broken: str, ca: Issued, volume: SecretVolume, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = issue(ca, tmp_path / "served")
    volume.publish_pair(served, ca)
    tls = serve_from(volume)
    fresh = issue(ca, tmp_path / "fresh")
    files = {"tls.crt": fresh.cert_pem, "tls.key": fresh.key_pem}
    if broken == "half-written certificate":
        files["tls.crt"] = fresh.cert_pem[: len(fresh.cert_pem) // 3]
    elif broken == "key of another certificate":
        files["tls.key"] = served.key_pem
    elif broken == "missing key":
        del files["tls.key"]
    elif broken == "empty certificate":
        files["tls.crt"] = b""
    else:
        files["tls.key"], files["tls.crt"] = rsa_pair(ca, tmp_path)
    volume.publish(files)  # without tls.key, its link points nowhere
    with caplog.at_level(logging.WARNING, logger="zstack_node.tls"):
        assert not tls.check() and not tls.check()  # a warning once, not at every look
    assert handshake(tls.context, ca.cert_path) == served.der
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "still serving the previous certificate" in warnings[0]
    assert str(volume.path("tls.crt")) in warnings[0] or str(volume.path("tls.key")) in warnings[0]
    volume.publish_pair(fresh, ca)  # the writer finishes: the good pair is served
    assert tls.check() and handshake(tls.context, ca.cert_path) == fresh.der


def rsa_pair(ca: Issued, tmp_path: Path) -> tuple[bytes, bytes]:
    """A certificate with an RSA key (the fixtures' keys are ECDSA), as (key, certificate) PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), cert.public_bytes(serialization.Encoding.PEM))


# -- refused at start ---------------------------------------------------------------------------------------


def node_config_error(*args: str) -> str:
    """zstack-node's output for `args`, asserting a usage error (exit 2) without a traceback."""
    result = CliRunner().invoke(node_main, list(args), env=NODE_ENV)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("flag", ["--tls-cert-file", "--tls-key-file"])
def test_one_tls_flag_alone_is_refused_naming_both(flag: str, ca: Issued, tmp_path: Path) -> None:
    server = issue(ca, tmp_path / "server")
    output = node_config_error(flag, str(server.cert_path if flag == "--tls-cert-file" else server.key_path))
    assert "--tls-cert-file" in output and "--tls-key-file" in output


@pytest.mark.parametrize(("problem", "flag"), [("missing certificate", CERT_FLAG), ("missing key", KEY_FLAG),
                                               ("key of another certificate", KEY_FLAG),
                                               ("not a certificate", CERT_FLAG), ("not a key", KEY_FLAG)])
def test_an_unusable_pair_stops_the_node_naming_the_flag_and_file(problem: str, flag: str, ca: Issued,
                                                                  tmp_path: Path) -> None:
    server, other = issue(ca, tmp_path / "server"), issue(ca, tmp_path / "other")
    cert, key = server.cert_path, server.key_path
    if problem == "missing certificate":
        cert = tmp_path / "nowhere" / "tls.crt"
    elif problem == "missing key":
        key = tmp_path / "nowhere" / "tls.key"
    elif problem == "key of another certificate":
        key = other.key_path
    elif problem == "not a certificate":
        cert = server.key_path
    else:
        key = server.cert_path
    with pytest.raises(ConfigError) as refused:
        check_files(str(cert), str(key))
    assert str(refused.value).startswith(flag), refused.value
    named = cert if flag == CERT_FLAG else key
    assert str(named) in str(refused.value)
    output = node_config_error("--tls-cert-file", str(cert), "--tls-key-file", str(key))
    assert flag.split(" / ")[0] in output and str(named) in output


# -- a real MN --------------------------------------------------------------------------------------------


def tls_mn(cloud: CloudCluster, volume: SecretVolume, ca: Issued) -> LocalNode:
    (node,) = cloud.start(1, ca_file=ca.cert_path, tls_cert_file=volume.path("tls.crt"),
                          tls_key_file=volume.path("tls.key"))
    return node


def metric(node: LocalNode, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(node.text("/metrics")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


class VerifiedApi(Api):
    """The API over HTTPS, verified against one CA (per request: REQUESTS_CA_BUNDLE would beat Session.verify)."""

    def __init__(self, node: LocalNode, ca: Issued) -> None:
        super().__init__(node.url)
        self.ca = str(ca.cert_path)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return super().request(method, path, verify=self.ca, **kwargs)


def verified(node: LocalNode, ca: Issued) -> VerifiedApi:
    return VerifiedApi(node, ca)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_mn_serves_https_and_takes_a_new_certificate_without_a_restart(
        cloud: CloudCluster, ca: Issued, volume: SecretVolume, tmp_path: Path) -> None:
    first = issue(ca, tmp_path / "first")
    volume.publish_pair(first, ca)
    node = tls_mn(cloud, volume, ca)
    pid, port = node.process.pid, node.http_port
    assert node.url.startswith("https://")
    assert verified(node, ca).ok("GET", "/v1/hosts", 200)["hosts"] == []
    assert verified(node, ca).request("GET", "/v1/hosts", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP on the port: no answer
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust the cluster's CA
        requests.get(f"{node.url}/healthz", timeout=10)
    assert metric(node, "zstack_tls_certificate_expiry_timestamp_seconds") == first.cert.not_valid_after_utc.timestamp()
    assert metric(node, "zstack_tls_reloads_total", result="success") == 0

    new_ca = make_ca(tmp_path / "new-ca")
    second = issue(new_ca, tmp_path / "second")
    volume.publish_pair(second, new_ca)  # the kubelet's swap of ..data
    wait_until(lambda: served_certificate("127.0.0.1", port) == second.der, 20, "the new certificate to be served")
    assert node.process.pid == pid and node.process.poll() is None
    node.ca_file = new_ca.cert_path
    assert verified(node, new_ca).ok("GET", "/v1/hosts", 200)["hosts"] == []
    with pytest.raises(requests.exceptions.SSLError):
        verified(node, ca).request("GET", "/v1/hosts")
    assert metric(node, "zstack_tls_reloads_total", result="success") == 1

    third = issue(new_ca, tmp_path / "third")
    volume.publish({"tls.crt": third.cert_pem[: len(third.cert_pem) // 3], "tls.key": third.key_pem,
                    "ca.crt": new_ca.cert_pem})  # half written
    wait_until(lambda: metric(node, "zstack_tls_reloads_total", result="error") == 1, 20, "the bad pair to be seen")
    volume.publish({"tls.crt": third.cert_pem, "tls.key": second.key_pem, "ca.crt": new_ca.cert_pem})  # mismatched
    wait_until(lambda: metric(node, "zstack_tls_reloads_total", result="error") == 2, 20, "the bad pair to be seen")
    assert served_certificate("127.0.0.1", port) == second.der
    assert verified(node, new_ca).ok("GET", "/v1/hosts", 200)["hosts"] == []
    log = node.tail(200)
    assert "cannot reload TLS" in log and str(volume.path("tls.crt")) in log and str(volume.path("tls.key")) in log
    assert "Traceback" not in log

    volume.publish_pair(third, new_ca)
    wait_until(lambda: served_certificate("127.0.0.1", port) == third.der, 20, "the fixed pair to be served")
    assert node.process.pid == pid and node.process.poll() is None
    assert metric(node, "zstack_tls_reloads_total", result="success") == 2


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_zstack_cli_verifies_an_mn_against_the_clusters_ca(cloud: CloudCluster, ca: Issued, volume: SecretVolume,
                                                          tmp_path: Path) -> None:
    volume.publish_pair(issue(ca, tmp_path / "server"), ca)
    node = tls_mn(cloud, volume, ca)
    env = {"ZSTACK_API_URL": node.url, "ZSTACK_API_TOKEN": TOKEN, "ZSTACK_CA_FILE": None}
    added = CliRunner().invoke(cli_main, ["--ca-file", str(volume.path("ca.crt")), "-o", "json", "hosts", "add",
                                          "tls-host", "--cpu", "4", "--memory", "4096"], env=env)
    assert added.exit_code == 0, added.output + node.tail()
    listed = CliRunner().invoke(cli_main, ["-o", "json", "hosts", "list"], env={**env, "ZSTACK_CA_FILE":
                                                                               str(volume.path("ca.crt"))})
    assert listed.exit_code == 0 and "tls-host" in listed.stdout, listed.output
    started = time.monotonic()
    refused = CliRunner().invoke(cli_main, ["hosts", "add", "other", "--cpu", "4", "--memory", "4096"], env=env)
    took = time.monotonic() - started
    assert refused.exit_code == 1, refused.output
    assert "cannot verify the certificate" in refused.stderr and "--ca-file" in refused.stderr
    assert "kubectl get secret <cluster>-api-tls" in refused.stderr
    assert "retrying" not in refused.output and took < 5
    assert "unencrypted" not in refused.stderr
