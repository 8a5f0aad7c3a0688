"""The wire format: round trips, and malformed bodies named precisely."""

import json

import pytest

from zstack_node.bus.envelope import Envelope, MalformedMessage


def test_round_trip_keeps_every_field():
    env = Envelope("StartVm", "vmInstance", "call", {"a": 1}, resource="ab" * 16, correlation="c1",
                   reply_to="zstack.message.cloudbus.x", deadline=123.5, hops=2, sender="s", idempotent=True)
    assert Envelope.decode(env.encode()) == env


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"\xff\xfe", "JSON"),
        (b"[1, 2]", "object"),
        (json.dumps({"service": "vm", "id": "1"}).encode(), "'type'"),
        (json.dumps({"type": "T", "service": "vm", "id": "1", "hops": "2"}).encode(), "'hops'"),
        (json.dumps({"type": "T", "service": "vm", "id": "1", "idempotent": 1}).encode(), "'idempotent'"),
        (json.dumps({"type": "T", "service": "vm", "id": "1", "hops": True}).encode(), "'hops'"),
        (json.dumps({"type": "T", "service": "vm", "id": "1", "kind": "shout"}).encode(), "'kind'"),
        (json.dumps({"type": "T", "service": "vm", "id": "1", "colour": "red"}).encode(), "colour"),
    ],
)
def test_malformed_bodies_are_refused_with_the_field_named(body, named):
    with pytest.raises(MalformedMessage, match=named):
        Envelope.decode(body)


def test_reply_carries_the_correlation_and_an_error():
    call = Envelope("T", "svc", "call", correlation="c9", reply_to="q")
    reply = call.reply("me", error={"code": "X", "message": "no"})
    assert (reply.kind, reply.correlation, reply.error["code"], reply.sender) == ("reply", "c9", "X", "me")


def test_hop_counts_reroutes_and_expiry_uses_the_deadline():
    env = Envelope("T", "svc", deadline=100.0)
    assert env.hop().hops == 1
    assert env.expired(now=100.0) and not env.expired(now=99.9)
