"""The cloud bus envelope: what every message on the wire looks like (JSON)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Kind = Literal["send", "call", "reply", "event", "api"]
KINDS: frozenset[str] = frozenset(("send", "call", "reply", "event", "api"))

MAX_HOPS = 5


class MalformedMessage(ValueError):
    """A body that is not a valid envelope. It is dead-lettered, never fatal."""


@dataclass(frozen=True)
class Envelope:
    """One message. `resource` picks the owner MN; `deadline` is a wall-clock UNIX time.

    `idempotent` marks a message as safe to repeat: a call pending on an MN that leaves the ring
    is re-sent to the new owner only when it is set, and fails at once otherwise.
    """

    type: str
    service: str
    kind: Kind = "send"
    body: dict[str, Any] = field(default_factory=dict)
    resource: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    correlation: str | None = None
    reply_to: str | None = None
    deadline: float | None = None
    hops: int = 0
    sender: str | None = None
    idempotent: bool = False
    error: dict[str, Any] | None = None

    def encode(self) -> bytes:
        # A shallow dict: dataclasses.asdict deep-copies the body, which doubled the encode cost.
        return _dumps({name: getattr(self, name) for name in _FIELD_ORDER}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        """Parse and check a body; raise MalformedMessage saying which field is wrong."""
        try:
            data = json.loads(raw)
        except Exception as exc:  # ValueError, and RecursionError for absurdly nested bodies
            raise MalformedMessage(f"body is not JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise MalformedMessage(f"body must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - _FIELDS
        if unknown:
            raise MalformedMessage(f"unknown field(s): {', '.join(sorted(unknown))}")
        for name in _REQUIRED:
            if not isinstance(data.get(name), str) or not data[name]:
                raise MalformedMessage(f"field {name!r} is missing or not a non-empty string")
        for name, types in _OPTIONAL.items():
            value = data.get(name)
            if value is not None and not _type_ok(value, types):
                raise MalformedMessage(f"field {name!r} has the wrong type: {value!r}")
        if data.get("kind", "send") not in KINDS:
            raise MalformedMessage(f"field 'kind' must be one of {sorted(KINDS)}, got {data['kind']!r}")
        return cls(**data)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) >= self.deadline

    def hop(self) -> Envelope:
        """The same message, one re-route further."""
        return replace(self, hops=self.hops + 1)

    def reply(self, sender: str, body: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> Envelope:
        """The reply to this call, carrying either a body or an error."""
        return Envelope(
            type=self.type,
            service=self.service,
            kind="reply",
            body=body or {},
            correlation=self.correlation,
            sender=sender,
            error=error,
        )


_FIELD_ORDER = tuple(Envelope.__dataclass_fields__)
_FIELDS = frozenset(_FIELD_ORDER)
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_REQUIRED = ("type", "service", "id")
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "body": dict,
    "resource": str,
    "correlation": str,
    "reply_to": str,
    "deadline": (int, float),
    "hops": int,
    "sender": str,
    "idempotent": bool,
    "error": dict,
}


def _type_ok(value: object, types: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass: only a bool field takes it
        return types is bool
    return isinstance(value, types)
