"""Idempotency keys: a retried POST or DELETE with the same `Idempotency-Key` gets the first job back.

The key is stored in PostgreSQL in the same transaction as the job it names, so it holds across MNs
and across the death of the MN that took the first request: a key either names an accepted job or
does not exist. Each key remembers a fingerprint of its request (operation, path parameters and the
checked body); the same key with another request is refused with a 422 naming the header.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Row

from zstack_node.cloud.validation import HttpError

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_LENGTH = 255
DEFAULT_RETENTION_HOURS = 24
_KEY_RE = re.compile(r"[!-~]{1,255}")  # visible ASCII: what fits any header and any log line unescaped
SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_LENGTH, "pattern": "^[!-~]+$"}


@dataclass(frozen=True)
class Claim:
    """A request's key and the fingerprint of what it asks."""

    key: str
    fingerprint: str


class KeyTaken(Exception):
    """Another request stored this key first (the transaction that tried is rolled back)."""


def claim_of(headers: list[str], operation: str, params: dict[str, Any]) -> Claim | None:
    """The request's claim, None without the header; a 400 naming the header when it is malformed."""
    if not headers:
        return None
    if len(headers) > 1:
        raise HttpError(400, "duplicate_field", f"{HEADER}: the header is given more than once", HEADER)
    key = headers[0]
    if not _KEY_RE.fullmatch(key):
        raise HttpError(400, "invalid_value", f"{HEADER}: must be 1-{MAX_LENGTH} visible ASCII characters (for "
                                             "example a random UUID)", HEADER)
    request = json.dumps([operation, params], sort_keys=True, separators=(",", ":"), default=str)
    return Claim(key, hashlib.sha256(request.encode()).hexdigest())


def find(conn: Connection, key: str) -> Row | None:
    """The stored key (fingerprint, job_id), if any."""
    return conn.execute(text("SELECT key, fingerprint, job_id FROM idempotency_keys WHERE key = :k"),
                        {"k": key}).first()


def store(conn: Connection, claim: Claim, job_id: str) -> None:
    """Store the key for `job_id` in the caller's transaction; raise KeyTaken if it exists."""
    if conn.execute(text(
            "INSERT INTO idempotency_keys (key, fingerprint, job_id) VALUES (:k, :f, :j) ON CONFLICT (key) DO NOTHING"),
            {"k": claim.key, "f": claim.fingerprint, "j": job_id}).rowcount != 1:
        raise KeyTaken(claim.key)


def forget(conn: Connection, job_id: str) -> None:
    """Drop the key of a job that was refused after all (its message could not be published)."""
    conn.execute(text("DELETE FROM idempotency_keys WHERE job_id = :j"), {"j": job_id})


def check_same(claim: Claim, stored: Row) -> None:
    """A 422 naming the header when the stored key was used for another request."""
    if stored.fingerprint != claim.fingerprint:
        raise HttpError(422, "idempotency_key_reused",
                        f"{HEADER}: {claim.key!r} was already used for a different request (job {stored.job_id}); "
                        "use a new key for a new request", HEADER)
