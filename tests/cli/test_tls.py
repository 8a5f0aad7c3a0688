"""zstack-cli over HTTPS, against the scripted fake MN behind real TLS: an https URL is always verified, a
certificate that does not verify is a clear error at once (never retried), and a token sent over plain http
to another host is warned about."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.cli.fakemn import Answer, FakeMn, accepted
from tests.fixtures.tls import Issued, issue, make_ca
from zstack_cli.cli import main
from zstack_cli.client import ApiClient, RequestFailed, sends_token_in_clear

pytestmark = pytest.mark.timeout(60)

HOSTS = Answer(200, {"hosts": [], "continue": None})


def server_context(server: Issued) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert_path, server.key_path)
    return context


@pytest.fixture
def ca(tmp_path: Path) -> Issued:
    return make_ca(tmp_path / "ca")


@pytest.fixture
def tls_mn(ca: Issued, tmp_path: Path) -> FakeMn:
    return FakeMn(accepted(), ssl_context=server_context(issue(ca, tmp_path / "server")))


def no_retry_client(url: str, ca_file: Path | None) -> tuple[ApiClient, list[float], list[str]]:
    api = ApiClient(url, "t0ken", 5.0, ca_file=str(ca_file) if ca_file else None)
    delays: list[float] = []
    told: list[str] = []
    api.sleep, api.on_retry = delays.append, told.append
    return api, delays, told


def test_an_https_url_verified_against_the_ca_file_works(ca: Issued, tls_mn: FakeMn) -> None:
    tls_mn.actions = [HOSTS]
    with tls_mn:
        result = CliRunner().invoke(main, ["--ca-file", str(ca.cert_path), "-o", "json", "hosts", "list"],
                                    env={"ZSTACK_API_URL": tls_mn.url, "ZSTACK_API_TOKEN": "t0ken"})
    assert result.exit_code == 0, result.output
    assert [(s.method, s.path, s.headers["authorization"]) for s in tls_mn.seen] == [("GET", "/v1/hosts",
                                                                                      "Bearer t0ken")]
    assert "warning" not in result.stderr


def test_an_unknown_ca_is_a_clear_error_at_once_and_never_retried(tls_mn: FakeMn) -> None:
    with tls_mn:
        api, delays, told = no_retry_client(tls_mn.url, None)
        with pytest.raises(RequestFailed) as failed:
            api.create_vm("web", 1, 64)  # a POST with a key: a lost answer would be retried
        started = time.monotonic()
        result = CliRunner().invoke(main, ["hosts", "add", "h1", "--cpu", "1", "--memory", "64"],
                                    env={"ZSTACK_API_URL": tls_mn.url, "ZSTACK_API_TOKEN": "t0ken",
                                         "ZSTACK_CA_FILE": None})
        took = time.monotonic() - started
    assert not failed.value.transport and delays == [] and told == []
    message = str(failed.value)
    assert "cannot verify the certificate" in message and "--ca-file / ZSTACK_CA_FILE" in message
    assert "kubectl get secret <cluster>-api-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d" in message
    assert result.exit_code == 1 and "--ca-file" in result.stderr and "retrying" not in result.output, result.output
    assert took < 3 and tls_mn.seen == []


def test_another_clusters_ca_names_the_ca_file(tls_mn: FakeMn, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other")
    with tls_mn:
        api, delays, _ = no_retry_client(tls_mn.url, other.cert_path)
        with pytest.raises(RequestFailed, match=f"does not verify against the CA in {other.cert_path}"):
            api.delete_host("a" * 32)
    assert delays == []


def test_a_certificate_for_another_host_says_so(ca: Issued, tmp_path: Path) -> None:
    elsewhere = issue(ca, tmp_path / "elsewhere", dns_names=["mn.example"], ip_addresses=[])
    with FakeMn(HOSTS, ssl_context=server_context(elsewhere)) as mn:
        api, delays, _ = no_retry_client(mn.url, ca.cert_path)
        with pytest.raises(RequestFailed, match="does not name its host .*127.0.0.1"):
            api.list_hosts()
    assert delays == []


def test_an_https_url_to_a_plain_http_port_says_so_and_is_not_retried(ca: Issued) -> None:
    with FakeMn(accepted()) as mn:
        api, delays, _ = no_retry_client(mn.url.replace("http://", "https://"), ca.cert_path)
        with pytest.raises(RequestFailed, match="does the MN serve HTTPS there"):
            api.create_vm("web", 1, 64)
    assert delays == [] and mn.seen == []


def test_an_unreadable_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    for path in (tmp_path / "missing.pem", tmp_path / "empty.pem"):
        result = CliRunner().invoke(main, ["--url", "https://127.0.0.1:1", "--ca-file", str(path), "ring"])
        assert result.exit_code == 2 and "--ca-file" in result.output and str(path) in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize(("url", "clear"), [
    ("http://10.0.0.5:8080", True), ("http://mn.example:8080", True), ("http://127.0.0.1:8080", False),
    ("http://127.1.2.3", False), ("http://localhost:8080", False), ("http://[::1]:8080", False),
    ("https://10.0.0.5:8080", False),
])
def test_which_urls_carry_a_token_in_clear(url: str, clear: bool) -> None:
    assert sends_token_in_clear(url) is clear


def test_a_token_over_plain_http_to_another_host_is_warned_about_once() -> None:
    env = {"ZSTACK_API_URL": "http://192.0.2.1:9", "ZSTACK_API_TOKEN": "t0ken", "ZSTACK_CA_FILE": None}
    result = CliRunner().invoke(main, ["--timeout", "0.2", "ring"], env=env)  # TEST-NET-1: nobody answers
    warnings = [line for line in result.stderr.splitlines() if "unencrypted" in line]
    assert len(warnings) == 1 and "t0ken" not in result.output, result.output
    with FakeMn(Answer(200, {"members": []})) as mn:  # loopback: no warning
        result = CliRunner().invoke(main, ["ring"], env={**env, "ZSTACK_API_URL": mn.url})
    assert "unencrypted" not in result.stderr


def test_tls_server_name_verifies_an_mn_reached_by_an_address_its_certificate_lacks(ca: Issued,
                                                                                     tmp_path: Path) -> None:
    # A certificate for the API Service only, as the operator issues it: a pod IP is in no certificate.
    service = issue(ca, tmp_path / "service", dns_names=("demo-api.prod.svc",), ip_addresses=())
    mn = FakeMn(accepted(), ssl_context=server_context(service))
    mn.actions = [HOSTS]
    env = {"ZSTACK_API_URL": None, "ZSTACK_API_TOKEN": "t0ken", "ZSTACK_CA_FILE": str(ca.cert_path)}
    with mn:
        env["ZSTACK_API_URL"] = mn.url
        refused = CliRunner().invoke(main, ["hosts", "list"], env=env)
        named = CliRunner().invoke(main, ["--tls-server-name", "demo-api.prod.svc", "-o", "json", "hosts", "list"],
                                   env=env)
        wrong = CliRunner().invoke(main, ["hosts", "list"], env={**env, "ZSTACK_TLS_SERVER_NAME": "other.prod.svc"})
    assert refused.exit_code == 1 and "--tls-server-name" in refused.stderr, refused.output
    assert named.exit_code == 0, named.output
    assert wrong.exit_code == 1 and "does not name its host" in wrong.stderr, wrong.output
    assert len(mn.seen) == 1, "only the verified request may reach the MN"
