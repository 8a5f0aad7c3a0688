"""The errors of the Kubernetes client layer: one for "Kubernetes is unusable", one for a failed call."""

from __future__ import annotations

import json


class KubeError(RuntimeError):
    """Kubernetes is unusable from here: no credentials to log in with, or an unknown namespace."""


class ApiError(KubeError):
    """A call to the API server failed: a non-2xx answer, or (status 0) no answer at all."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip() if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_answer(cls, status: int, raw: bytes | str, fallback: str = "") -> ApiError:
        """From the body of a non-2xx answer: the API server's Status object, or its text."""
        try:
            doc = json.loads(raw)
            return cls(status, doc.get("message", fallback), doc.get("reason", ""))
        except (ValueError, TypeError, AttributeError):
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            return cls(status, text[:500] or fallback)

    @classmethod
    def no_answer(cls, exc: BaseException) -> ApiError:
        """A call that got no answer (connection refused, timeout, TLS): its cause in one line."""
        cause = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the real error
        exc = cause if isinstance(cause, BaseException) else exc
        lines = str(exc).strip().splitlines()
        return cls(0, f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__)

    @property
    def transient(self) -> bool:
        """Worth retrying as it is: no answer, the server overloaded or failing."""
        return self.status == 0 or self.status == 429 or self.status >= 500


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of the API server's answer behind `exc`; None when there was no answer (status 0, or
    not an ApiError at all: a failed login, say)."""
    return (exc.status or None) if isinstance(exc, ApiError) else None


def describe(exc: BaseException) -> str:
    """One line about a failed call, no traceback: the API server's own words where it answered (e.g. which
    RBAC permission is missing), else the exception's type and text."""
    return str(exc) if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
