"""zstack-cli against 3 real MN processes (real RabbitMQ and PostgreSQL), each command as a user runs it."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from zstack_cli.cli import main
from zstack_devcluster.localnodes import LocalNode, agreed_members, wait_until
from zstack_devcluster.services import PostgreSQL, RabbitMQ

pytestmark = pytest.mark.slow

TOKEN = secrets.token_urlsafe(18)


class Mns:
    """Three MNs with the API token set, sharing a database and a vhost of their own."""

    def __init__(self, nodes: list[LocalNode], sql: Callable[[str, tuple[Any, ...]], None]) -> None:
        self.nodes = nodes
        self.sql = sql  # runs one statement on the MNs' database (to inject simulated faults)

    def cli(self, *args: str, node: int = 0, token: str | None = TOKEN, url: str | None = None) -> Result:
        """Run zstack-cli in-process against one MN, or `url` (stdout and stderr apart)."""
        env = {"ZSTACK_API_URL": url or self.nodes[node].url, "ZSTACK_API_TOKEN": token}
        return CliRunner().invoke(main, list(args), env=env)

    def ok(self, *args: str, node: int = 0) -> Any:
        """Run with -o json; assert exit 0; return the parsed JSON."""
        result = self.cli("-o", "json", *args, node=node)
        assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}\n{self.logs()}"
        return json.loads(result.stdout)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.tail(30)}" for n in self.nodes)


@pytest.fixture(scope="module")
def mns(rabbitmq: RabbitMQ, postgres: PostgreSQL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mns]:
    database = postgres.create_database()
    vhost = f"cli-{secrets.token_hex(4)}"
    broker_url = rabbitmq.add_vhost(vhost)
    log_dir = tmp_path_factory.mktemp("cli-mns")
    nodes = [LocalNode(f"cli-mn{i}", broker_url, postgres.url_for(database), log_dir,
                       env={"ZSTACK_API_TOKEN": TOKEN}) for i in range(3)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready(90)
        expected = frozenset(node.uuid for node in nodes)
        wait_until(lambda: agreed_members(nodes) == expected, 60, "3 MNs to agree on one ring")

        def sql(statement: str, params: tuple[Any, ...]) -> None:
            conn = postgres.connect(database)
            try:
                with conn.cursor() as cur:
                    cur.execute(statement, params)
            finally:
                conn.close()

        yield Mns(nodes, sql)
    finally:
        for node in nodes:
            node.stop(timeout=15)
        postgres.drop_database(database)
        rabbitmq.delete_vhost(vhost)


@pytest.fixture(scope="module")
def host(mns: Mns) -> dict[str, Any]:
    job = mns.ok("hosts", "add", "cli-host-a", "--cpu", "64", "--memory", "262144")
    assert job["state"] == "Succeeded" and job["operation"] == "host.add"
    return job["result"]


def test_hosts_add_list_get(mns: Mns, host: dict[str, Any]) -> None:
    assert host["name"] == "cli-host-a" and host["cpu_capacity"] == 64 and host["memory_capacity"] == 262144
    assert host["uuid"] in {h["uuid"] for h in mns.ok("hosts", "list", node=1)["hosts"]}
    assert mns.ok("hosts", "get", host["uuid"], node=2)["uuid"] == host["uuid"]
    table = mns.cli("hosts", "list")
    assert table.exit_code == 0 and table.stdout.splitlines()[0].startswith("UUID")
    assert any(line.split()[:2] == [host["uuid"], "cli-host-a"] for line in table.stdout.splitlines())


def test_vm_lifecycle_create_stop_start_destroy(mns: Mns, host: dict[str, Any]) -> None:
    job = mns.ok("vms", "create", "cli-vm-1", "--cpu", "2", "--memory", "2048")
    assert job["operation"] == "vm.create" and job["state"] == "Succeeded"
    vm = job["result"]
    assert vm["state"] == "Running" and vm["host_uuid"]
    for action, state, node in (("stop", "Stopped", 1), ("start", "Running", 2), ("reboot", "Running", 0)):
        job = mns.ok("vms", action, vm["uuid"], node=node)
        assert (job["operation"], job["state"]) == (f"vm.{action}", "Succeeded")
        assert mns.ok("vms", "get", vm["uuid"], node=(node + 1) % 3)["state"] == state
    assert vm["uuid"] in {v["uuid"] for v in mns.ok("vms", "list", "--state", "running")["vms"]}
    assert mns.ok("vms", "destroy", vm["uuid"])["state"] == "Succeeded"
    assert mns.ok("vms", "get", vm["uuid"])["state"] == "Destroyed"


def test_migrate_moves_the_vm_and_reconnect_keeps_the_host_connected(mns: Mns) -> None:
    source, target = (mns.ok("hosts", "add", f"cli-mig-{n}", "--cpu", "4", "--memory", "4096")["result"]
                      for n in ("src", "dst"))
    vm = mns.ok("vms", "create", "cli-vm-mig", "--cpu", "1", "--memory", "512", "--host", source["uuid"])["result"]
    assert vm["host_uuid"] == source["uuid"]
    job = mns.ok("vms", "migrate", vm["uuid"], "--host", target["uuid"], node=1)
    assert (job["operation"], job["state"]) == ("vm.migrate", "Succeeded")
    moved = mns.ok("vms", "get", vm["uuid"], node=2)
    assert (moved["host_uuid"], moved["state"]) == (target["uuid"], "Running")
    assert mns.ok("hosts", "get", target["uuid"])["cpu_used"] == 1
    assert mns.ok("hosts", "get", source["uuid"])["cpu_used"] == 0
    assert mns.ok("hosts", "reconnect", source["uuid"])["state"] == "Succeeded"
    assert mns.ok("hosts", "get", source["uuid"])["state"] == "Connected"


def test_no_wait_returns_the_job_and_jobs_wait_finishes_it(mns: Mns, host: dict[str, Any]) -> None:
    accepted = mns.ok("vms", "create", "cli-vm-2", "--cpu", "1", "--memory", "512", "--no-wait")
    assert accepted["state"] in ("Pending", "Running", "Succeeded") and len(accepted["id"]) == 32
    done = mns.ok("jobs", "wait", accepted["id"], node=1)
    assert done["id"] == accepted["id"] and done["state"] == "Succeeded" and done["finished_at"]
    assert mns.ok("jobs", "get", accepted["id"], node=2)["state"] == "Succeeded"
    listed = mns.ok("jobs", "list", "--resource", done["resource_uuid"])["jobs"]
    assert accepted["id"] in {j["id"] for j in listed}


def test_ring_and_owner_agree_with_every_mn(mns: Mns) -> None:
    ring = mns.ok("ring")
    assert set(ring["members"]) == {n.uuid for n in mns.nodes} and ring["self"] == mns.nodes[0].uuid
    resource = secrets.token_hex(16)
    owners = {mns.ok("ring", "owner", resource, node=i)["owner"] for i in range(3)}
    assert len(owners) == 1 and owners <= set(ring["members"])
    table = mns.cli("ring")
    assert table.exit_code == 0 and "members (3):" in table.stdout and "(self)" in table.stdout


def test_the_vm_ran_on_the_mn_the_ring_names(mns: Mns, host: dict[str, Any]) -> None:
    vm = mns.ok("vms", "create", "cli-vm-3", "--cpu", "1", "--memory", "256")["result"]
    job = mns.ok("vms", "stop", vm["uuid"], node=2)
    assert job["mn"] == mns.ok("ring", "owner", vm["uuid"])["owner"]


def test_hosts_ping_through_any_mn_is_answered_by_the_owner(mns: Mns, host: dict[str, Any]) -> None:
    owner = mns.ok("ring", "owner", host["uuid"])["owner"]
    for node in range(3):
        answer = mns.ok("hosts", "ping", host["uuid"], node=node)
        assert answer == {"uuid": host["uuid"], "reachable": True, "error": None, "tracked_by": owner,
                          "seconds": answer["seconds"]}
    table = mns.cli("hosts", "ping", host["uuid"], node=1)
    assert table.exit_code == 0 and table.stderr == "", table.output
    assert [line.split() for line in table.stdout.splitlines()][:4] == [
        ["uuid:", host["uuid"]], ["reachable:", "True"], ["error:", "-"], ["tracked_by:", owner]]


def test_hosts_ping_of_a_host_that_does_not_answer_exits_1(mns: Mns) -> None:
    # Too small for any VM of the other tests; the tracker disconnects it soon, which changes nothing here.
    down = mns.ok("hosts", "add", "cli-host-down", "--cpu", "1", "--memory", "1")["result"]
    mns.sql("INSERT INTO sim_host_faults (host_uuid) VALUES (%s)", (down["uuid"],))
    try:
        result = mns.cli("-o", "json", "hosts", "ping", down["uuid"], node=2)
    finally:
        mns.sql("DELETE FROM sim_host_faults WHERE host_uuid = %s", (down["uuid"],))
    assert result.exit_code == 1, result.output
    answer = json.loads(result.stdout)  # the answer still goes to stdout, for scripts
    assert (answer["uuid"], answer["reachable"]) == (down["uuid"], False), answer
    assert answer["tracked_by"] == mns.ok("ring", "owner", down["uuid"])["owner"]
    assert result.stderr == f"error: {answer['error']}\n" and "did not answer" in answer["error"]


def test_a_failed_job_exits_1_with_its_error(mns: Mns, host: dict[str, Any]) -> None:
    result = mns.cli("-o", "json", "vms", "create", "cli-vm-huge", "--cpu", "256", "--memory", "1024")
    assert result.exit_code == 1, result.output
    job = json.loads(result.stdout)  # the failed job still goes to stdout, for scripts
    assert (job["operation"], job["state"], job["error"]["code"]) == ("vm.create", "Failed", "no_capacity")
    assert result.stderr.startswith(f"error: job {job['id']} (vm.create) failed: no_capacity: ")


def test_deleting_a_host_with_vms_is_refused(mns: Mns) -> None:
    busy = mns.ok("hosts", "add", "cli-host-busy", "--cpu", "8", "--memory", "8192")["result"]
    mns.ok("vms", "create", "cli-vm-pinned", "--cpu", "1", "--memory", "128", "--host", busy["uuid"])
    result = mns.cli("hosts", "delete", busy["uuid"])
    # 409 when the MN sees the VMs at request time (exit 2), else the job fails with host_has_vms (exit 1)
    assert result.exit_code in (1, 2), result.output
    assert result.stderr.startswith("error: ") and "has VMs" in result.stderr.replace("host_has_vms", "has VMs")
    assert mns.ok("hosts", "get", busy["uuid"])["uuid"] == busy["uuid"]


def test_an_invalid_transition_is_an_error_not_a_traceback(mns: Mns, host: dict[str, Any]) -> None:
    vm = mns.ok("vms", "create", "cli-vm-4", "--cpu", "1", "--memory", "256")["result"]
    result = mns.cli("vms", "start", vm["uuid"])  # already Running
    # 409 when the MN sees it at request time (exit 2), else the job fails with invalid_state (exit 1)
    assert result.exit_code in (1, 2) and result.stderr.startswith("error: "), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "status_words"), [
    (["vms", "get", "0" * 32], ("0" * 32,)),  # 404 naming the UUID
    (["vms", "create", "too-big", "--cpu", "100000", "--memory", "1"], ("cpu",)),
    (["hosts", "add", "x" * 256, "--cpu", "1", "--memory", "1"], ("name",)),  # names are 1-255 characters
    (["hosts", "ping", "0" * 32], ("0" * 32,)),  # 404 naming the UUID
])
def test_bad_input_answered_4xx_exits_2_with_the_message(mns: Mns, args: list[str],
                                                         status_words: tuple[str, ...]) -> None:
    result = mns.cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert any(word in result.stderr.lower() for word in status_words), result.stderr


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_a_missing_or_wrong_token_says_what_to_set(mns: Mns, token: str | None) -> None:
    result = mns.cli("vms", "list", token=token)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unauthorized") and "ZSTACK_API_TOKEN" in result.stderr
    assert TOKEN not in result.output and (token is None or token not in result.output)


def test_the_console_script_prints_no_traceback(mns: Mns) -> None:
    script = shutil.which("zstack-cli")
    assert script, "the zstack-cli console script is not installed (pip install -e '.[test]')"
    env = {**os.environ, "ZSTACK_API_URL": mns.nodes[1].url, "ZSTACK_API_TOKEN": "nope"}
    done = subprocess.run([script, "hosts", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: unauthorized") and "Traceback" not in done.stderr


def test_an_mn_without_a_token_says_to_configure_it(fresh_vhost: str, fresh_database: str, tmp_path: Path) -> None:
    bare = LocalNode("cli-bare", fresh_vhost, fresh_database, tmp_path, env={"ZSTACK_API_TOKEN": ""})
    try:
        bare.start().wait_ready(90)
        result = CliRunner().invoke(main, ["--url", bare.url, "--token", TOKEN, "hosts", "list"])
    finally:
        bare.stop(timeout=15)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unauthorized") and "on the MN" in result.stderr
    assert "refused" not in result.stderr and TOKEN not in result.output


# -- paging and retries ------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_vms_list_all_walks_every_page_and_the_default_page_says_more_remain(mns: Mns) -> None:
    host = mns.ok("hosts", "add", "cli-host-paged", "--cpu", "1", "--memory", "1")["result"]
    seeded = {uuid.uuid4().hex for _ in range(250)}
    # Rows straight into the database (paging reads rows; how they got there does not matter).
    mns.sql("INSERT INTO vm_instances (uuid, name, cpu, memory, host_uuid, state)"
            " SELECT u, 'seeded-' || u, 1, 64, %s, 'Stopped' FROM unnest(%s::varchar[]) AS u",
            (host["uuid"], sorted(seeded)))
    try:
        every = mns.cli("-o", "json", "vms", "list", "--host", host["uuid"], "--all", node=1)
        first = mns.cli("vms", "list", "--host", host["uuid"], node=2)
        bigger = mns.ok("vms", "list", "--host", host["uuid"], "--limit", "1000")
    finally:
        mns.sql("DELETE FROM vm_instances WHERE uuid = ANY(%s::varchar[])", (sorted(seeded),))
    assert every.exit_code == 0 and every.stderr == "", every.output
    rows = json.loads(every.stdout)["vms"]  # one JSON document for all 3 pages
    assert len(rows) == 250 and {r["uuid"] for r in rows} == seeded
    assert [r["uuid"] for r in rows] == sorted(seeded)
    assert first.exit_code == 0 and len(first.stdout.splitlines()) == 1 + 100, first.output
    assert first.stderr.startswith("note: showing the first 100 VMs; more remain") and "--all" in first.stderr
    assert len(bigger["vms"]) == 250


@pytest.mark.timeout(300)
def test_jobs_list_all_in_small_pages_is_the_whole_list_newest_first(mns: Mns) -> None:
    busy = mns.ok("hosts", "add", "cli-host-jobs", "--cpu", "1", "--memory", "1")["result"]
    made = [mns.ok("hosts", "reconnect", busy["uuid"], node=n % 3)["id"] for n in range(4)]
    whole = mns.ok("jobs", "list", "--resource", busy["uuid"], "--limit", "1000")["jobs"]
    walked = mns.ok("jobs", "list", "--resource", busy["uuid"], "--all", "--limit", "2", node=1)["jobs"]
    ids = [j["id"] for j in walked]
    assert len(ids) >= 5 and len(ids) == len(set(ids)) and {j["id"] for j in whole} | set(made) <= set(ids)
    assert [i for i in ids if i in made] == made[::-1]  # newest first
    assert [j["created_at"] for j in walked] == sorted((j["created_at"] for j in walked), reverse=True)


class DroppingProxy:
    """Forwards every request to an MN, but drops the first POST's answer after the MN has answered it:
    the request was done, the client never hears so."""

    def __init__(self, target: str) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.posts: list[dict[str, Any]] = []  # key sent, status and Idempotent-Replayed answered, job id
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> DroppingProxy:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=90)
        try:
            conn.request(method, path, body or None, headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                status, answer_headers, data = proxy.forward(self.command, self.path, body, headers)
                if self.command == "POST":
                    answered = dict((k.lower(), v) for k, v in answer_headers)
                    proxy.posts.append({"key": self.headers.get("Idempotency-Key"), "status": status,
                                        "replayed": answered.get("idempotent-replayed"),
                                        "job": json.loads(data).get("job", {}).get("id")})
                    if len(proxy.posts) == 1:
                        self.close_connection = True  # drop it: the client sees the connection closed
                        return
                self.send_response(status)
                for name, value in answer_headers:
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _relay  # noqa: N815 - http.server's naming

            def log_message(self, *_args: object) -> None:
                pass

        return Handler


@pytest.mark.timeout(300)
def test_a_create_whose_answer_was_lost_is_retried_and_done_once(mns: Mns, host: dict[str, Any]) -> None:
    with DroppingProxy(mns.nodes[1].url) as proxy:
        result = mns.cli("-o", "json", "vms", "create", "cli-vm-retried", "--cpu", "1", "--memory", "64",
                         url=proxy.url)
    assert result.exit_code == 0, f"{result.output}\n{mns.logs()}"
    job = json.loads(result.stdout)
    assert (job["operation"], job["state"]) == ("vm.create", "Succeeded")
    first, retry = proxy.posts
    assert first["key"] == retry["key"] and len(first["key"]) == 32
    assert (first["status"], first["replayed"]) == (202, None)
    assert (retry["status"], retry["replayed"]) == (202, "true")
    assert first["job"] == retry["job"] == job["id"]
    assert "retrying in" in result.stderr and "Idempotent-Replayed" in result.stderr
    named = [v for v in mns.ok("vms", "list", "--all")["vms"] if v["name"] == "cli-vm-retried"]
    assert [v["uuid"] for v in named] == [job["result"]["uuid"]]
    creates = [j for j in mns.ok("jobs", "list", "--resource", job["resource_uuid"])["jobs"]
               if j["operation"] == "vm.create"]
    assert [j["id"] for j in creates] == [job["id"]]


@pytest.mark.timeout(300)
def test_a_hostile_name_in_the_database_is_shown_escaped(mns: Mns) -> None:
    hostile = uuid.uuid4().hex
    name = "\x1b[31mred\u202eevil\nrow"
    mns.sql("INSERT INTO vm_instances (uuid, name, cpu, memory, state) VALUES (%s, %s, 1, 64, 'Stopped')",
            (hostile, name))
    try:
        table = mns.cli("vms", "get", hostile)
        listed = mns.cli("-o", "json", "vms", "list", "--all")
    finally:
        mns.sql("DELETE FROM vm_instances WHERE uuid = %s", (hostile,))
    assert table.exit_code == 0, table.output
    assert [line.split() for line in table.stdout.splitlines() if line.startswith("name:")] == [
        ["name:", "\\x1b[31mred\\u202eevil\\nrow"]]
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout
    assert listed.exit_code == 0 and listed.stdout.isascii()
    assert name in {v["name"] for v in json.loads(listed.stdout)["vms"]}
