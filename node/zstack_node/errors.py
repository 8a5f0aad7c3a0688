"""Errors shared across the MN, and a helper for reporting them in one log line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is invalid. The message names the flag and env var and says what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
