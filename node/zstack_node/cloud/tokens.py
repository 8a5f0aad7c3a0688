"""The API's bearer tokens: from a flag or a file, up to two at once, compared in constant time.

A file (`--api-token-file`, in Kubernetes a mounted Secret) keeps the token out of the environment,
where `kubectl describe` and /proc would show it. It holds one token per line, and up to two: during a
rotation both the old and the new token are valid, so clients move over without downtime. The file is
read again when it changes (a Secret volume is updated in place), so a rotation needs no restart.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from zstack_node.errors import ConfigError

log = logging.getLogger(__name__)

MAX_TOKENS = 2


class ApiTokens:
    """The valid tokens: `token` (a flag or env var), or those in `path`, reloaded when the file changes."""

    def __init__(self, token: str | None = None, path: str | None = None) -> None:
        self._path = Path(path) if path else None
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: tuple[bytes, ...] = (token.encode(),) if token else ()
        if self._path is not None:
            self._tokens = self._read()  # a missing or bad file stops the MN at start, naming the flag

    @property
    def configured(self) -> bool:
        return bool(self._current())

    def accepts(self, given: str) -> bool:
        """Whether `given` is a valid token, comparing with every token in constant time."""
        candidate = given.encode()
        matched = False
        for token in self._current():
            matched |= hmac.compare_digest(candidate, token)
        return matched

    def _current(self) -> tuple[bytes, ...]:
        if self._path is None:
            return self._tokens
        try:
            stamp = _stamp(self._path)
            if stamp != self._stamp:
                self._tokens = self._read()
                log.info("read %d API token(s) from %s", len(self._tokens), self._path)
        except (OSError, ConfigError) as exc:  # mid-update or removed: keep what was valid
            log.warning("cannot read the API tokens in %s (%s); the previous ones stay valid", self._path, exc)
        return self._tokens

    def _read(self) -> tuple[bytes, ...]:
        assert self._path is not None
        try:
            self._stamp = _stamp(self._path)
            lines = self._path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-token-file / ZSTACK_API_TOKEN_FILE: cannot read {self._path}: "
                              f"{exc.strerror or exc}") from None
        tokens = tuple(line.strip().encode() for line in lines if line.strip())
        if not tokens or len(tokens) > MAX_TOKENS:
            raise ConfigError(f"--api-token-file / ZSTACK_API_TOKEN_FILE: {self._path} must hold 1 or {MAX_TOKENS} "
                              f"tokens, one per line (it holds {len(tokens)})")
        return tokens


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten or a Secret volume swaps its data link."""
    status = os.stat(path)
    return status.st_ino, status.st_mtime_ns, status.st_size
