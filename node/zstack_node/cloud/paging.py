"""Keyset paging of the lists: `?limit=N`, and an opaque `?continue=TOKEN` naming where the last page ended.

A page is the next `limit` rows after a key that never changes (a UUID, or a job's creation time and
id), read through an index, so a page costs the same at row 10 as at row 100,000, and a walk through
every page sees each row that existed throughout exactly once, whatever is inserted or deleted
meanwhile. The token carries the key and the filters it was issued for; it is base64 of JSON, not a
secret, and a tampered token can only move the walk, never widen what the filters show.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any

from zstack_node.cloud.validation import Field, HttpError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_TOKEN = 1024
LIMIT = Field("limit", "int", minimum=1, maximum=MAX_LIMIT, description=f"Rows per page (default {DEFAULT_LIMIT})")
CONTINUE = Field("continue", "str", minimum=1, maximum=MAX_TOKEN,
                 description="The `continue` token of the previous page: the page after it")
QUERY = (LIMIT, CONTINUE)

Filters = dict[str, Any]


def encode(kind: str, filters: Filters, key: Sequence[str]) -> str:
    doc = {"l": kind, "f": filters, "k": list(key)}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")


def resume(params: dict[str, Any], kind: str, filters: Filters, key_length: int) -> list[str] | None:
    """The key after which this page starts (None: the first page); a 400 naming `continue` if the token is
    not one this list issued with these filters."""
    token = params.get("continue")
    if token is None:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise _bad_token("is not a token this API issued") from None
    key = doc.get("k") if isinstance(doc, dict) else None
    if (doc.get("l") if isinstance(doc, dict) else None) != kind or not isinstance(key, list) \
            or len(key) != key_length or not all(isinstance(part, str) for part in key):
        raise _bad_token(f"is not a token of this list ({kind})")
    if doc.get("f") != filters:
        raise _bad_token("was issued for other filters; repeat the first request's filters with it, or start over "
                         "without it")
    return key


def page(kind: str, rows: Sequence[Any], limit: int, filters: Filters, to_dict: Callable[[Any], dict[str, Any]],
         key_of: Callable[[Any], Sequence[str]]) -> dict[str, Any]:
    """The response body of one page from `limit + 1` rows read: the extra row says that more remain."""
    body: dict[str, Any] = {kind: [to_dict(row) for row in rows[:limit]]}
    if len(rows) > limit:
        body["continue"] = encode(kind, filters, key_of(rows[limit - 1]))
    return body


def limit_of(params: dict[str, Any]) -> int:
    return int(params.get("limit", DEFAULT_LIMIT))


def _bad_token(why: str) -> HttpError:
    return HttpError(400, "invalid_value", f"continue: the token {why}", "continue")
