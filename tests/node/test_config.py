"""Configuration errors name the flag and env var, and the CLI refuses bad values."""

import re

import pytest
from click.testing import CliRunner

from zstack_node.cli import main
from zstack_node.config import ConfigError, Settings, redact, url_setting

GOOD = {"broker_url": "amqp://u:p@127.0.0.1:5672/%2F", "database_url": "postgresql://u:p@127.0.0.1/zstack"}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"broker_url": "http://127.0.0.1"}, "--broker-url / ZSTACK_BROKER_URL"),
        ({"broker_url": ""}, "--broker-url"),
        ({"database_url": "mysql://x@h/db"}, "--database-url / ZSTACK_DATABASE_URL"),
        ({"database_url": "postgresql://u@h:99999/db"}, "--database-url"),
        ({"heartbeat_interval": 0}, "--heartbeat-interval"),
        ({"heartbeat_timeout": 1.5}, "--heartbeat-timeout"),
        ({"heartbeat_timeout": float("inf")}, "--heartbeat-timeout"),
        ({"heartbeat_timeout": float("nan")}, "--heartbeat-timeout"),
        ({"heartbeat_interval": float("inf"), "heartbeat_timeout": float("inf")}, "--heartbeat-interval"),
        ({"lease_duration": float("inf")}, "--lease-duration"),
        ({"call_timeout": 1e12}, "--call-timeout"),
        ({"ring_vnodes": 0}, "--ring-vnodes"),
        ({"http_port": 70000}, "--http-port"),
    ],
)
def test_bad_settings_name_the_setting(override, named):
    with pytest.raises(ConfigError, match=named):
        Settings(**{**GOOD, **override}).validate()


def test_passwords_never_appear_in_errors():
    with pytest.raises(ConfigError) as err:
        Settings(**{**GOOD, "broker_url": "http://user:s3cret@h"}).validate()
    assert "s3cret" not in str(err.value)
    assert redact("amqp://u:s3cret@h/") == "amqp://u:***@h/"


def test_postgres_urls_get_the_psycopg2_driver():
    settings = Settings(**{**GOOD, "database_url": "postgres://u@h/db"}).validate()
    assert settings.database_url_for_sqlalchemy == "postgresql+psycopg2://u@h/db"


def test_cli_reports_a_bad_env_var_by_name():
    result = CliRunner().invoke(main, [], env={"ZSTACK_BROKER_URL": "amqp://h", "ZSTACK_DATABASE_URL": "x://h/db"})
    assert result.exit_code == 2
    assert "ZSTACK_DATABASE_URL" in result.output


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400"])
def test_cli_refuses_a_non_finite_timeout_without_a_traceback(value):
    result = CliRunner().invoke(main, ["--heartbeat-timeout", value], env={
        "ZSTACK_BROKER_URL": GOOD["broker_url"], "ZSTACK_DATABASE_URL": GOOD["database_url"]})
    assert result.exit_code == 2, result.output
    assert "--heartbeat-timeout" in result.output and "Traceback" not in result.output


def test_cli_reports_an_unloadable_service():
    result = CliRunner().invoke(main, ["--service", "no.such.module:Nope"], env={
        "ZSTACK_BROKER_URL": GOOD["broker_url"], "ZSTACK_DATABASE_URL": GOOD["database_url"]})
    assert result.exit_code == 2
    assert "--service" in result.output and "no.such.module" in result.output


def test_leases_follow_pod_name_unless_forced():
    assert not Settings(**GOOD).validate().leases_enabled
    assert Settings(**GOOD, pod_name="demo-mn-0").validate().leases_enabled
    assert not Settings(**GOOD, pod_name="demo-mn-0", kubernetes="off").validate().leases_enabled
    forced = Settings(**GOOD, kubernetes="on", hostname="host-1").validate()
    assert forced.leases_enabled and forced.lease_name == "host-1"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"kubernetes": "maybe"}, "--kubernetes / ZSTACK_KUBERNETES"),
        ({"pod_name": "mn-0", "lease_duration": 1.0}, "--lease-duration"),
        # twice the interval, but a renewal's timeout and retry would let a healthy MN's Lease expire
        ({"pod_name": "mn-0", "heartbeat_interval": 2.0, "heartbeat_timeout": 4.0, "lease_duration": 4.0},
         "--lease-duration"),
        ({"pod_name": "Bad_Name"}, "--pod-name / POD_NAME"),
        ({"pod_name": "mn-0", "cluster": "no spaces"}, "--cluster"),
    ],
)
def test_bad_lease_settings_name_the_setting(override, named):
    with pytest.raises(ConfigError, match=named):
        Settings(**{**GOOD, **override}).validate()


def test_cli_with_leases_forced_on_needs_a_namespace():
    result = CliRunner().invoke(main, ["--kubernetes", "on"], env={
        "ZSTACK_BROKER_URL": GOOD["broker_url"], "ZSTACK_DATABASE_URL": GOOD["database_url"],
        "POD_NAMESPACE": None})
    assert result.exit_code == 2
    assert "POD_NAMESPACE" in result.output


def test_urls_come_from_files_kept_out_of_the_environment(tmp_path):
    broker, database = tmp_path / "broker", tmp_path / "database"
    broker.write_text("amqp://zstack:s3cret@rabbit:5672/%2F\n")  # a Secret's value may end in a newline
    database.write_text("postgresql://zstack:s3cret@pg:5432/zstack")
    assert url_setting("broker_url", None, str(broker)) == "amqp://zstack:s3cret@rabbit:5672/%2F"
    assert url_setting("database_url", None, str(database)) == "postgresql://zstack:s3cret@pg:5432/zstack"
    assert url_setting("broker_url", "amqp://h", None) == "amqp://h"


@pytest.mark.parametrize("value, path, named", [
    (None, None, "--broker-url / ZSTACK_BROKER_URL or --broker-url-file / ZSTACK_BROKER_URL_FILE is required"),
    ("amqp://h", "/x", "pass exactly one of them"),
    (None, "/no/such/file", "--broker-url-file / ZSTACK_BROKER_URL_FILE: cannot read /no/such/file"),
])
def test_a_missing_or_doubled_url_names_both_flags(value, path, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        url_setting("broker_url", value, path)


def test_cli_reads_the_url_files_and_names_a_bad_one(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = CliRunner().invoke(main, [], env={"ZSTACK_BROKER_URL_FILE": str(empty), "ZSTACK_DATABASE_URL": "x"})
    assert result.exit_code == 2 and "--broker-url-file / ZSTACK_BROKER_URL_FILE" in result.output, result.output
    assert "Traceback" not in result.output
