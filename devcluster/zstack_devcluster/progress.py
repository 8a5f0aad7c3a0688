"""Progress output for long waits: a live line on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

Say = Callable[[str], None]


def stderr_say(msg: str) -> None:
    """Default message sink: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


class Ticker:
    """Shows ``waiting for <what> ... <elapsed>s`` while a wait lasts."""

    def __init__(self, say: Say, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.say = say
        self.stream = stream if stream is not None else sys.stderr
        self.live = say is stderr_say and self.stream.isatty()
        self.every = every
        self.start = time.monotonic()
        self._last = self.start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def tick(self, what: str) -> None:
        """Report progress (rate-limited) while still waiting for ``what``."""
        now = time.monotonic()
        if self.live:
            self.stream.write(f"\r\033[K  waiting for {what} ... {now - self.start:.1f}s")
            self.stream.flush()
        elif now - self._last >= self.every:
            self.say(f"  still waiting for {what} ({now - self.start:.0f}s)")
            self._last = now

    def done(self, msg: str) -> None:
        """Clear the live line and print a final message."""
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.say(msg)
