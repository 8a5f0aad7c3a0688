"""Pure tests: request validation, the OpenAPI document, VM transitions and the sync queue."""

from __future__ import annotations

import asyncio
import re

import pytest

from zstack_node.cloud.routes import HOST_CREATE, ROUTES, VM_CREATE, openapi_document
from zstack_node.cloud.syncqueue import SyncQueues
from zstack_node.cloud.validation import Field, HttpError, check_query, check_uuid, parse_json
from zstack_node.cloud.vms import invalid_transition

GOOD_HOST = {"name": "h1", "cpu": 8, "memory": 1024}


def error_of(call, *args) -> HttpError:
    with pytest.raises(HttpError) as info:
        call(*args)
    return info.value


def test_a_good_body_passes_through():
    assert HOST_CREATE.check(dict(GOOD_HOST)) == GOOD_HOST
    assert VM_CREATE.check({"name": "v", "cpu": 1, "memory": 1, "uuid": "a" * 32})["uuid"] == "a" * 32


@pytest.mark.parametrize("body, code, field", [
    ({**GOOD_HOST, "cpu": "8"}, "wrong_type", "cpu"),
    ({**GOOD_HOST, "cpu": True}, "wrong_type", "cpu"),
    ({**GOOD_HOST, "cpu": 8.5}, "wrong_type", "cpu"),
    ({**GOOD_HOST, "cpu": 0}, "out_of_range", "cpu"),
    ({**GOOD_HOST, "cpu": 4097}, "out_of_range", "cpu"),
    ({**GOOD_HOST, "name": ""}, "out_of_range", "name"),
    ({**GOOD_HOST, "name": "x" * 256}, "out_of_range", "name"),
    ({**GOOD_HOST, "name": None}, "wrong_type", "name"),
    ({**GOOD_HOST, "colour": "red"}, "unknown_field", "colour"),
    ({"name": "h", "cpu": 1}, "missing_field", "memory"),
    ({**GOOD_HOST, "uuid": "A" * 32}, "bad_uuid", "uuid"),
    ({**GOOD_HOST, "uuid": "12345678-1234-1234-1234-123456789012"}, "bad_uuid", "uuid"),
    ({**GOOD_HOST, "uuid": 7}, "wrong_type", "uuid"),
    ({**GOOD_HOST, "uuid": "a" * 32 + "\n"}, "bad_uuid", "uuid"),
    ({**GOOD_HOST, "name": "h\x00"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "h\ud800"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "\udfff"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "line\nbreak"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "\x1b[31mred"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "tab\there"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "del\x7f"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "c1\x9b"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "gpj.\u202eexe"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "isolate\u2067"}, "invalid_value", "name"),
    ({**GOOD_HOST, "name": "para\u2029graph"}, "invalid_value", "name"),
    ([1, 2], "wrong_type", None),
])
def test_bad_bodies_name_the_field(body, code, field):
    err = error_of(HOST_CREATE.check, body)
    assert (err.status, err.code, err.field) == (400, code, field)
    if field:
        assert field in str(err)


def test_bad_json_and_uuids_and_queries():
    assert error_of(parse_json, b"{nope").code == "bad_json"
    assert parse_json(b"  ") is None
    assert error_of(check_uuid, "xyz", "uuid").field == "uuid"
    for bad in ("a" * 32 + "\n", "\n" + "a" * 32, "a" * 31 + "\x00", "a" * 31 + "\ud800"):
        assert error_of(check_uuid, bad, "uuid").code == "bad_uuid", repr(bad)
    assert check_uuid("0123456789abcdef" * 2, "uuid") == "0123456789abcdef" * 2
    spec = (Field("limit", "int", minimum=1, maximum=10), Field("wait", "number", minimum=0, maximum=60))
    assert check_query({"limit": "3", "wait": "0.5"}.items(), spec) == {"limit": 3, "wait": 0.5}
    assert error_of(check_query, {"limit": "x"}.items(), spec).code == "wrong_type"
    assert error_of(check_query, {"wait": "nan"}.items(), spec).code == "wrong_type"
    assert error_of(check_query, {"wait": "61"}.items(), spec).code == "out_of_range"
    assert error_of(check_query, {"other": "1"}.items(), spec).field == "other"
    uuids = (Field("host_uuid", "uuid"), Field("state", "enum", choices=("Running",)))
    for query, field in [({"host_uuid": "a" * 32 + "\n"}, "host_uuid"), ({"state": "Running\x00"}, "state"),
                         ({"state": "Running\n"}, "state"), ({"host_uuid": "\ud800"}, "host_uuid")]:
        assert error_of(check_query, query.items(), uuids).field == field, query


def test_names_may_be_any_printable_text_up_to_255_characters():
    for name in ("x" * 255, "数据库-01", "café ☕", "a b", "x"):
        assert HOST_CREATE.check({**GOOD_HOST, "name": name})["name"] == name


def test_the_documented_name_pattern_is_the_check():
    pattern = re.compile(openapi_document()["components"]["schemas"]["VmCreate"]["properties"]["name"]["pattern"])
    chars = [chr(c) for c in range(0x2100)] + ["\U0001f600", "\ufeff"]
    for char in chars:
        name = f"a{char}b"
        try:
            accepted = VM_CREATE.check({"name": name, "cpu": 1, "memory": 1})["name"] == name
        except HttpError:
            accepted = False
        assert accepted == bool(pattern.fullmatch(name)), repr(char)


def test_a_bad_name_says_which_character_and_where():
    err = error_of(HOST_CREATE.check, {**GOOD_HOST, "name": "ok\u202eevil"})
    assert "U+202E" in str(err) and "position 2" in str(err) and err.field == "name"


@pytest.mark.parametrize("raw", ["1_0", "\u0665", "\uff11", "+1", "-1", " 1", "1 ", "0x10", "1e1", "", "1.", ".5",
                                 "1.5.1", "inf", "\u0661\u0660"])
def test_query_numbers_are_ascii_digits_only(raw):
    spec = (Field("limit", "int", minimum=0, maximum=100), Field("wait", "number", minimum=0, maximum=60))
    assert error_of(check_query, [("limit", raw)], spec).field == "limit"
    assert error_of(check_query, [("wait", raw)], spec).field == "wait"


def test_query_numbers_take_a_decimal_point_only_where_a_fraction_makes_sense():
    spec = (Field("limit", "int", minimum=0, maximum=100), Field("wait", "number", minimum=0, maximum=60))
    assert check_query([("wait", "0.25"), ("limit", "007")], spec) == {"wait": 0.25, "limit": 7}
    assert error_of(check_query, [("limit", "1.0")], spec).code == "wrong_type"


def test_a_query_key_given_twice_is_refused():
    spec = (Field("state", "enum", choices=("Running", "Stopped")),)
    err = error_of(check_query, [("state", "Running"), ("state", "Stopped")], spec)
    assert (err.status, err.code, err.field) == (400, "duplicate_field", "state")


def test_vm_transitions():
    assert invalid_transition("start", "Stopped") is None
    assert "Running" in invalid_transition("start", "Running")
    assert invalid_transition("destroy", "Running") is None
    assert invalid_transition("migrate", "Stopped")


def test_openapi_document_covers_every_route_with_security():
    doc = openapi_document()
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert str(route.success[0]) in op["responses"]
        assert bool(op["security"]) == route.auth
        if "503" in op["responses"]:  # a client learns from the document that a 503 says when to retry
            assert "Retry-After" in op["responses"]["503"]["headers"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["components"]["schemas"]["HostCreate"]["additionalProperties"] is False


def test_sync_queue_runs_one_key_in_order_and_keys_concurrently():
    async def scenario() -> tuple[list[str], int, int]:
        queues = SyncQueues()
        log: list[str] = []
        running: dict[str, int] = {}
        peak = {"a": 0, "all": 0}

        def work(key: str, n: int, delay: float):
            async def run() -> int:
                running[key] = running.get(key, 0) + 1
                peak["a"] = max(peak["a"], running.get("a", 0))
                peak["all"] = max(peak["all"], sum(running.values()))
                await asyncio.sleep(delay)
                log.append(f"{key}{n}")
                running[key] -= 1
                return n
            return run

        futures = [queues.submit("a", work("a", n, 0.02 - n * 0.004)) for n in range(5)]
        futures += [queues.submit("b", work("b", n, 0.001)) for n in range(3)]
        results = await asyncio.gather(*futures)
        assert results == [0, 1, 2, 3, 4, 0, 1, 2]
        assert queues.busy() == 0, "idle chains are removed"
        return log, peak["a"], peak["all"]

    log, peak_a, peak_all = asyncio.run(scenario())
    assert [x for x in log if x[0] == "a"] == ["a0", "a1", "a2", "a3", "a4"]
    assert peak_a == 1 and peak_all == 2


def test_sync_queue_failure_does_not_block_the_chain():
    async def scenario() -> list[object]:
        queues = SyncQueues()

        async def boom() -> None:
            raise ValueError("x")

        async def fine() -> str:
            return "ok"

        return await asyncio.gather(queues.submit("k", boom), queues.submit("k", fine), return_exceptions=True)

    first, second = asyncio.run(scenario())
    assert isinstance(first, ValueError) and second == "ok"
