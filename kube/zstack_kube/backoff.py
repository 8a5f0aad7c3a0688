"""Exponential back-off: the one schedule every retry loop of the product uses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays that double from `initial` up to `cap`; `reset()` after a success starts over.

    >>> b = Backoff(0.2, 1.0)
    >>> [b.next() for _ in range(5)]
    [0.2, 0.4, 0.8, 1.0, 1.0]
    """

    initial: float = 0.2
    cap: float = 5.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False, repr=False)

    def next(self) -> float:
        """The delay before the next try."""
        delay = self._next or self.initial
        self._next = min(delay * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        self._next = 0.0
