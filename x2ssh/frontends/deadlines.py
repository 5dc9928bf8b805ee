"""One timer for many deadlines of the same length (the proxy's handshake and channel-open timeouts).

A timer per connection costs a `TimerHandle`, a heap push and, when it is cancelled (nearly always), a heap
entry that lingers until the loop cleans it up. Every deadline here is "now + the same delay", so they
expire in the order they were set: an insertion-ordered map is their queue, and one loop timer, set for the
earliest, serves all of them. Removing a deadline is a dict deletion; no timer is touched.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Call `callback(key)` for each key still here `delay` seconds after `add(key)`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[[K], None]) -> None:
        self._loop = loop
        self.delay = delay
        self._callback = callback
        self._due: collections.OrderedDict[K, float] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def add(self, key: K) -> None:
        """Start (or restart) `key`'s deadline."""
        due = self._due
        due.pop(key, None)
        due[key] = self._loop.time() + self.delay
        if self._timer is None:
            self._timer = self._loop.call_at(due[key], self._expire)

    def discard(self, key: K) -> None:
        """Forget `key` (no callback for it)."""
        self._due.pop(key, None)

    def close(self) -> None:
        """Forget every key and stop the timer."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        due = self._due
        now = self._loop.time() + 0.001  # the loop runs a timer up to its clock resolution early
        expired = []
        while due:
            key, when = next(iter(due.items()))
            if when > now:
                break
            due.popitem(last=False)
            expired.append(key)
        if due:
            self._timer = self._loop.call_at(next(iter(due.values())), self._expire)
        for key in expired:
            try:
                self._callback(key)
            except Exception:  # one key's failure must not keep the others alive
                log.exception("deadline callback for %r failed", key)
