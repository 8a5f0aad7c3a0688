"""The private RabbitMQ and PostgreSQL servers (devcluster.services) and their pytest fixtures."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pika
import psycopg2
import pytest
import sqlalchemy as sa
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from zstack_devcluster.procs import all_procs
from zstack_devcluster.services import PostgreSQL, RabbitMQ, ServiceError, free_ports, port_is_free
from zstack_devcluster.services.base import is_alive


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _assert_all_gone(procs: list, roots: list[int]) -> None:
    """No recorded process is alive, and no process is left in the groups of the processes we spawned."""
    alive = [(p.pid, _comm(p.pid)) for p in procs if is_alive(p)]
    assert not alive, f"processes survived stop(): {alive}"
    in_groups = [(p.pid, p.pgid, _comm(p.pid)) for p in all_procs()
                 if p.pgid in roots and p.state not in ("Z", "X")]
    assert not in_groups, f"processes left in our process groups: {in_groups}"


def _amqp(url: str, **overrides: object) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    for key, value in overrides.items():
        setattr(params, key, value)
    return pika.BlockingConnection(params)


# -- RabbitMQ ----------------------------------------------------------------------------------------------


def test_publish_and_consume_through_the_private_broker(rabbitmq: RabbitMQ) -> None:
    assert rabbitmq.url.startswith(f"amqp://{rabbitmq.username}:")
    assert rabbitmq.url.endswith(f"@127.0.0.1:{rabbitmq.port}/%2F")
    conn = _amqp(rabbitmq.url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", queue, b"hello", pika.BasicProperties(content_type="text/plain"))
        got: list[bytes] = []

        def on_message(channel, method, properties, body: bytes) -> None:
            got.append(body)
            channel.basic_ack(method.delivery_tag)
            channel.stop_consuming()

        ch.basic_consume(queue, on_message)
        conn.call_later(10, ch.stop_consuming)
        ch.start_consuming()
        assert got == [b"hello"]
    finally:
        conn.close()


def test_fresh_vhost_is_separate_from_the_default_one(rabbitmq: RabbitMQ, fresh_vhost: str) -> None:
    assert fresh_vhost != rabbitmq.url and fresh_vhost.startswith(rabbitmq.url[: -len("%2F")])
    conn = _amqp(fresh_vhost)
    try:
        conn.channel().queue_declare("only-here", auto_delete=False)
    finally:
        conn.close()
    conn = _amqp(rabbitmq.url)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().queue_declare("only-here", passive=True)
        assert err.value.reply_code == 404
    finally:
        conn.close()


def test_broker_restart_keeps_port_credentials_and_durable_messages(rabbitmq: RabbitMQ) -> None:
    url, port = rabbitmq.url, rabbitmq.port
    conn = _amqp(url)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("survives-restart", durable=True)
    ch.queue_purge("survives-restart")
    ch.basic_publish("", "survives-restart", b"kept", pika.BasicProperties(delivery_mode=2))

    rabbitmq.restart()

    assert (rabbitmq.url, rabbitmq.port) == (url, port)
    with pytest.raises(pika.exceptions.AMQPError):  # the old connection was closed by the broker
        conn.process_data_events(time_limit=1)
    conn = _amqp(url)
    try:
        ch = conn.channel()
        method, _, body = ch.basic_get("survives-restart", auto_ack=True)
        assert method is not None and body == b"kept"
        ch.queue_delete("survives-restart")
    finally:
        conn.close()


def test_stopping_the_broker_leaves_no_process(rabbitmq: RabbitMQ) -> None:
    procs = rabbitmq.known_procs
    names = {_comm(p.pid) for p in procs if is_alive(p)}
    assert {"beam.smp", "epmd", "erl_child_setup"} <= names, names
    roots = rabbitmq.root_pids
    try:
        rabbitmq.stop()
        _assert_all_gone(procs, roots)
        assert rabbitmq.pids == []
        assert port_is_free(rabbitmq.port) and port_is_free(rabbitmq.epmd_port) and port_is_free(rabbitmq.dist_port)
    finally:
        rabbitmq.start()
    _amqp(rabbitmq.url).close()


def test_paused_broker_answers_nothing_until_resumed(rabbitmq: RabbitMQ) -> None:
    rabbitmq.pause()
    try:
        with pytest.raises((pika.exceptions.AMQPError, AMQPConnectorException)):
            _amqp(rabbitmq.url, socket_timeout=1, stack_timeout=2)
    finally:
        rabbitmq.resume()
    _amqp(rabbitmq.url).close()


# -- PostgreSQL --------------------------------------------------------------------------------------------


def test_sql_round_trip(postgres: PostgreSQL, fresh_database: str) -> None:
    assert fresh_database.startswith(f"postgresql+psycopg2://{postgres.username}:")
    engine = sa.create_engine(fresh_database)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE mn (uuid text PRIMARY KEY, port int)"))
            conn.execute(sa.text("INSERT INTO mn VALUES (:u, :p)"), [{"u": "a", "p": 1}, {"u": "b", "p": 2}])
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT uuid, port FROM mn ORDER BY uuid")).all()
        assert [tuple(r) for r in rows] == [("a", 1), ("b", 2)]
    finally:
        engine.dispose()


def test_fresh_databases_do_not_see_each_other(postgres: PostgreSQL, fresh_database: str) -> None:
    other = postgres.url_for(postgres.create_database())
    for url in (fresh_database, other):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))  # would fail if the databases were shared
        engine.dispose()
    postgres.drop_database(other.rsplit("/", 1)[1])


def test_postgres_stop_then_start_keeps_port_and_data(postgres: PostgreSQL, fresh_database: str) -> None:
    engine = sa.create_engine(fresh_database, pool_pre_ping=True)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (x int)"))
        conn.execute(sa.text("INSERT INTO kept VALUES (42)"))
    port = postgres.port
    with postgres.stopped():
        time.sleep(1)
        with pytest.raises(sa.exc.OperationalError), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    assert postgres.port == port
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT x FROM kept")).scalar_one() == 42
    engine.dispose()


def test_stopping_postgres_leaves_no_process(postgres: PostgreSQL) -> None:
    busy = [postgres.connect() for _ in range(3)]  # backends are processes of their own
    procs = postgres.known_procs
    assert len([p for p in procs if is_alive(p)]) >= 4
    roots = postgres.root_pids
    try:
        postgres.stop()
        _assert_all_gone(procs, roots)
        assert port_is_free(postgres.port)
    finally:
        for conn in busy:
            conn.close()
        postgres.start()


def test_paused_postgres_times_out_until_resumed(postgres: PostgreSQL) -> None:
    postgres.pause()
    try:
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(postgres.url.replace("+psycopg2", ""), connect_timeout=1)
    finally:
        postgres.resume()
    postgres.connect().close()


def test_a_server_that_cannot_start_fails_with_the_reason_and_its_log(tmp_path: Path) -> None:
    server = PostgreSQL(tmp_path / "pg")
    server.start()
    server.stop()
    with open(server.data_dir / "postgresql.conf", "a") as fh:
        fh.write("\nno_such_setting_anywhere = 1\n")
    with pytest.raises(ServiceError) as err:
        server.start()
    message = str(err.value)
    assert "failed to start" in message and str(server.log_file) in message
    assert "no_such_setting_anywhere" in message  # the log tail names the culprit
    assert server.pids == [] and not server.is_running


def test_a_busy_port_is_reported_before_anything_starts(tmp_path: Path) -> None:
    server = PostgreSQL(tmp_path / "pg")
    server.start()
    server.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        with pytest.raises(ServiceError, match=f"port=.*{server.port}.* in use"):
            server.start()
    assert not server.is_running


# -- both --------------------------------------------------------------------------------------------------


def test_credentials_are_random_and_never_logged(rabbitmq: RabbitMQ, postgres: PostgreSQL) -> None:
    assert len(rabbitmq.password) >= 32 and len(postgres.password) >= 32
    assert rabbitmq.password != postgres.password
    assert rabbitmq.password not in repr(rabbitmq) and "***" in rabbitmq.display_url
    for path in (rabbitmq.log_file, rabbitmq.console_log, postgres.log_file):
        text = path.read_text(errors="replace")
        assert rabbitmq.password not in text and postgres.password not in text, path
    assert (rabbitmq.base_dir / "state.json").stat().st_mode & 0o077 == 0


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    for port in ports:
        assert port_is_free(port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_servers_also_serve_a_pod_network_on_a_second_address_across_restarts(tmp_path: Path) -> None:
    """What the container node's pods need: the server also on the host's end of the node's veth, and
    PostgreSQL accepting the pod network (tests/k8s proves it with pods; 127.0.0.2 stands in for it here)."""
    with PostgreSQL(tmp_path / "pg").start() as postgres, RabbitMQ(tmp_path / "mq").start() as rabbitmq:
        for server in (postgres, rabbitmq):
            with pytest.raises(RuntimeError, match="serve_pods"):
                server.url_for_pods(server.url)
            assert port_is_free(server.port, "127.0.0.2"), "only loopback until asked"
            server.serve_pods("127.0.0.2", "127.0.0.0/8")
        for _ in range(2):  # and again after a restart: the setting is kept with the server's state
            pg_url, mq_url = postgres.url_for_pods(postgres.url), rabbitmq.url_for_pods(rabbitmq.url)
            assert "@127.0.0.2:" in pg_url and "@127.0.0.2:" in mq_url
            with sa.create_engine(pg_url).connect() as conn:
                assert conn.execute(sa.text("select host(inet_server_addr())")).scalar() == "127.0.0.2"
            _amqp(mq_url).close()
            postgres.restart()
            rabbitmq.restart()
