"""Request validation: small field specs that both check bodies and describe them in OpenAPI.

Pure logic, no I/O. Every failure is an `HttpError` whose message names the field and the value.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

UUID_RE = re.compile(r"^[0-9a-f]{32}$")  # anchored for OpenAPI; checked with fullmatch ($ allows a trailing "\n")
MAX_BODY = 64 * 1024
INTEGER_RE = re.compile(r"[0-9]+")  # ASCII only: int() would take "1_0" and "٥"
DECIMAL_RE = re.compile(r"[0-9]+(\.[0-9]+)?")
# Characters that change how text is shown rather than being shown: bidi embeddings, overrides and isolates
# (a name with U+202E prints reversed), the marks, and the line and paragraph separators.
INVISIBLE_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                               "\u2028\u2029")
# The same rule for OpenAPI clients and fuzzers (Cc is U+0000-U+001F and U+007F-U+009F).
NAME_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]+$"


class HttpError(Exception):
    """An error answer: HTTP status, stable code, human message, and the offending field (or None)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.retry_after = retry_after  # seconds, sent as Retry-After (a 503 that passes)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": str(self), "field": self.field}}


@dataclass(frozen=True)
class Field:
    """One JSON field: `kind` is "str", "name" (printable text), "int", "number", "uuid" or "enum"."""

    name: str
    kind: str
    required: bool = False
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple[str, ...] = ()
    description: str = ""

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any]
        if self.kind in ("str", "name"):
            schema = {"type": "string", "minLength": self.minimum or 0}
            if self.maximum is not None:
                schema["maxLength"] = self.maximum
            if self.kind == "name":
                schema["pattern"] = NAME_PATTERN
        elif self.kind in ("int", "number"):
            schema = {"type": "integer" if self.kind == "int" else "number"}
            if self.minimum is not None:
                schema["minimum"] = self.minimum
            if self.maximum is not None:
                schema["maximum"] = self.maximum
        elif self.kind == "uuid":
            schema = {"type": "string", "pattern": UUID_RE.pattern, "minLength": 32, "maxLength": 32}
        else:
            schema = {"type": "string", "enum": list(self.choices)}
        if self.description:
            schema["description"] = self.description
        return schema

    def check(self, value: Any, where: str) -> Any:
        """Return the value converted to its Python type, or raise a 400 naming `where`."""
        if self.kind in ("str", "name"):
            if not isinstance(value, str):
                raise _bad_type(where, "a string", value)
            low, high = self.minimum or 0, self.maximum
            if len(value) < low or (high is not None and len(value) > high):
                raise HttpError(400, "out_of_range", f"{where}: length {len(value)} is not within {low}-{high}",
                               where)
            return check_name(value, where) if self.kind == "name" else check_text(value, where)
        if self.kind in ("int", "number"):
            wanted = (int,) if self.kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise _bad_type(where, "an integer" if self.kind == "int" else "a number", value)
            if value != value or value in (float("inf"), float("-inf")):
                raise HttpError(400, "invalid_value", f"{where}: must be a finite number", where)
            if (self.minimum is not None and value < self.minimum) or (
                    self.maximum is not None and value > self.maximum):
                raise HttpError(400, "out_of_range",
                               f"{where}: {value} is not within {self.minimum}-{self.maximum}", where)
            return value
        if self.kind == "uuid":
            if not isinstance(value, str):
                raise _bad_type(where, "a UUID string (32 lowercase hex characters)", value)
            return check_uuid(value, where)
        if not isinstance(value, str) or value not in self.choices:
            raise HttpError(400, "invalid_value", f"{where}: {_show(value)} is not one of {', '.join(self.choices)}",
                           where)
        return value

    def parse(self, raw: str, where: str) -> Any:
        """Convert a query-string value, then check it."""
        if self.kind == "int":
            if not INTEGER_RE.fullmatch(raw):
                raise _bad_type(where, "an integer of ASCII digits", raw)
            return self.check(int(raw), where)
        if self.kind == "number":
            if not DECIMAL_RE.fullmatch(raw):
                raise _bad_type(where, "a number of ASCII digits with an optional decimal point", raw)
            return self.check(float(raw), where)
        return self.check(raw, where)


@dataclass(frozen=True)
class Body:
    """A JSON object body: the allowed fields; anything else is an unknown field."""

    name: str
    fields: tuple[Field, ...]

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: f.json_schema() for f in self.fields},
            "additionalProperties": False,
        }
        required = [f.name for f in self.fields if f.required]
        if required:
            schema["required"] = required
        return schema

    def check(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise HttpError(400, "wrong_type", f"the body must be a JSON object, got {_type_name(data)}", None)
        known = {f.name: f for f in self.fields}
        for key in data:
            if key not in known:
                raise HttpError(400, "unknown_field", f"{key}: unknown field (allowed: {', '.join(known)})", key)
        out = {}
        for spec in self.fields:
            if spec.name in data:
                out[spec.name] = spec.check(data[spec.name], spec.name)
            elif spec.required:
                raise HttpError(400, "missing_field", f"{spec.name}: required field is missing", spec.name)
        return out


def check_uuid(value: str, where: str) -> str:
    if not UUID_RE.fullmatch(value):
        raise HttpError(400, "bad_uuid", f"{where}: {_show(value)} is not a UUID (32 lowercase hex characters)", where)
    return value


def check_text(value: str, where: str) -> str:
    """Refuse text PostgreSQL cannot store: NUL characters, and lone surrogates (not encodable as UTF-8)."""
    if "\x00" in value:
        raise HttpError(400, "invalid_value", f"{where}: must not contain NUL characters", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HttpError(400, "invalid_value", f"{where}: must be valid Unicode text (lone surrogate at position "
                                             f"{exc.start})", where) from None
    return value


def check_name(value: str, where: str) -> str:
    """Refuse what a terminal would not print as text: control characters (a newline, ESC of "\\x1b[31m")
    and the invisible bidi and separator characters that reorder or split what follows."""
    check_text(value, where)
    for position, char in enumerate(value):
        if unicodedata.category(char) == "Cc" or char in INVISIBLE_CONTROLS:
            raise HttpError(400, "invalid_value", f"{where}: must be printable text; U+{ord(char):04X} "
                                                 f"({unicodedata.name(char, 'a control character')}) at position "
                                                 f"{position} is not", where)
    return value


def parse_json(raw: bytes) -> Any:
    """Decode a request body; an empty body is None."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, "bad_json", f"the body is not valid JSON: {exc}", None) from None


def check_query(params: Iterable[tuple[str, str]], fields: tuple[Field, ...]) -> dict[str, Any]:
    """Check query parameters (as sent, in order); unknown and repeated ones are refused."""
    known = {f.name: f for f in fields}
    out: dict[str, Any] = {}
    for key, raw in params:
        spec = known.get(key)
        if spec is None:
            allowed = ", ".join(known) or "none"
            raise HttpError(400, "unknown_field", f"{key}: unknown query parameter (allowed: {allowed})", key)
        if key in out:
            raise HttpError(400, "duplicate_field", f"{key}: the query parameter is given more than once", key)
        out[key] = spec.parse(raw, key)
    return out


def _bad_type(where: str, wanted: str, value: Any) -> HttpError:
    return HttpError(400, "wrong_type", f"{where}: must be {wanted}, got {_type_name(value)} {_show(value)}", where)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
