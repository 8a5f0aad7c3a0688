"""zstack-cli's argument checks and its errors when no MN answers (no server needed)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from zstack_cli.cli import UUID, main
from zstack_cli.client import ApiClient, RequestFailed, _error_from_body
from zstack_devcluster.ports import free_port

SECRET = "s3cret-token-value"


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args", [
    ["vms", "get", "not-a-uuid"],
    ["hosts", "delete", "abc"],
    ["jobs", "wait", "1234"],
    ["ring", "owner", "x" * 32],
    ["hosts", "ping", "not-a-host"],
])
def test_a_bad_uuid_is_a_usage_error_naming_the_argument(args: list[str]) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert "is not a UUID (32 hex characters" in result.output
    assert "Traceback" not in result.output


def test_dashed_or_upper_case_uuids_are_normalised() -> None:
    assert UUID.convert("0123ABCD-0123-4567-89AB-0123456789AB", None, None) == "0123abcd0123456789ab0123456789ab"


@pytest.mark.parametrize(("args", "named"), [
    (["hosts", "add", "h1", "--memory", "1024"], "--cpu"),
    (["hosts", "add", "h1", "--cpu", "0", "--memory", "1024"], "--cpu"),
    (["vms", "create", "v1", "--cpu", "two", "--memory", "1"], "--cpu"),
    (["vms", "list", "--state", "Sleeping"], "--state"),
    (["jobs", "list", "--limit", "0"], "--limit"),
    (["-o", "yaml", "ring"], "--output"),
    (["--timeout", "0", "ring"], "--timeout"),
    (["--url", "ftp://example.org", "ring"], "--url"),
    (["--url", "http://127.0.0.1:8080/v1", "ring"], "--url"),
])
def test_bad_options_are_usage_errors_naming_the_option(args: list[str], named: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert named in result.output


@pytest.mark.parametrize("command", [["hosts", "list"], ["hosts", "ping", "a" * 32]])
def test_no_mn_listening_says_what_to_do_and_exits_1(command: list[str]) -> None:
    port = free_port()
    result = cli("--url", f"http://127.0.0.1:{port}", "--token", SECRET, *command)
    assert result.exit_code == 1
    assert result.output.startswith(f"error: cannot reach http://127.0.0.1:{port}")
    assert "ZSTACK_API_URL" in result.output
    assert SECRET not in result.output and "Traceback" not in result.output


def test_an_mn_that_never_answers_times_out_with_a_hint(silent_port: int) -> None:
    result = cli("--url", f"http://127.0.0.1:{silent_port}", "--timeout", "0.3", "vms", "list")
    assert result.exit_code == 1
    assert "no answer within 0.3s" in result.output and "--timeout" in result.output


def test_the_token_from_the_environment_is_never_shown() -> None:
    env = {"ZSTACK_API_TOKEN": SECRET}
    for args in (["--help"], ["hosts", "add", "--help"], ["--url", f"http://127.0.0.1:{free_port()}", "ring"]):
        assert SECRET not in cli(*args, env=env).output
    assert SECRET not in repr(ApiClient(token=SECRET))


def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it() -> None:
    result = cli("--token", "geheim-\u00fc", "ring")
    assert result.exit_code == 2 and "--token" in result.output and "geheim" not in result.output


def test_api_errors_in_the_contract_shape_keep_code_and_field() -> None:
    body = b'{"error": {"code": "bad_type", "message": "cpu: expected an integer, got \\"two\\"", "field": "cpu"}}'
    err = _error_from_body(400, body, "Bad Request")
    assert (str(err), err.code, err.field, err.exit_code) == ('cpu: expected an integer, got "two"', "bad_type",
                                                              "cpu", 2)


@pytest.mark.parametrize(("status", "body", "message", "exit_code"), [
    (503, b'{"error": "the ring is empty: this MN is not serving"}', "the ring is empty: this MN is not serving", 1),
    (404, b"404: Not Found", "404: Not Found", 2),
    (500, b"", "HTTP 500 Internal Server Error", 1),
])
def test_other_error_bodies_still_give_a_message(status: int, body: bytes, message: str, exit_code: int) -> None:
    err = _error_from_body(status, body, "Internal Server Error")
    assert (str(err), err.exit_code) == (message, exit_code)


def test_unreachable_is_not_a_4xx() -> None:
    assert RequestFailed("cannot reach").exit_code == 1


def test_a_server_that_is_not_http_gets_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]

        def answer_garbage() -> None:
            conn, _ = sock.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        threading.Thread(target=answer_garbage, daemon=True).start()
        result = cli("--url", f"http://127.0.0.1:{port}", "--timeout", "5", "hosts", "list")
    assert result.exit_code == 1
    assert "broken HTTP answer (BadStatusLine)" in result.output and "Traceback" not in result.output


def test_a_redirect_is_refused_and_the_token_never_follows_it() -> None:
    """A proxy or a wrong --url that redirects elsewhere must not receive the bearer token."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_args: object) -> None:
            pass

    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/hosts"

    class Redirecting(Elsewhere):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    servers = [elsewhere, redirecting]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = cli("--url", f"http://127.0.0.1:{redirecting.server_address[1]}", "--token", SECRET, "hosts", "list")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert result.exit_code == 1, result.output
    assert "redirect (302)" in result.output and "--url" in result.output
    assert seen == [], "the redirect target must never be contacted"
    assert SECRET not in result.output
