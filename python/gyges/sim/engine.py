"""A deterministic discrete-event loop: a heap ordered by (time, sequence number).

Events scheduled for the same instant run in the order they were scheduled, so a run
depends only on its inputs. Cancelling is lazy: :meth:`EventLoop.cancel` marks a handle
and the loop skips it when it comes up.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Handle:
    __slots__ = ("cancelled", "time")

    def __init__(self, time: float) -> None:
        self.time = time
        self.cancelled = False


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Handle, Callable[[], None]]] = []
        self._seq = 0
        self.processed = 0

    def __call__(self) -> float:
        """The simulated clock (what ``TransformationScheduler`` reads)."""
        return self.now

    def at(self, time: float, fn: Callable[[], None]) -> Handle:
        """Run ``fn`` at ``time`` (never before now)."""
        t = max(time, self.now)
        h = Handle(t)
        heapq.heappush(self._heap, (t, self._seq, h, fn))
        self._seq += 1
        return h

    def after(self, delay: float, fn: Callable[[], None]) -> Handle:
        return self.at(self.now + delay, fn)

    @staticmethod
    def cancel(h: Handle | None) -> None:
        if h is not None:
            h.cancelled = True

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until: float = float("inf"),
            progress: Callable[[float], None] | None = None) -> None:
        """Process events in (time, seq) order until none is left or time passes ``until``."""
        heap = self._heap
        while heap:
            t, _, h, fn = heap[0]
            if t > until:
                break
            heapq.heappop(heap)
            if h.cancelled:
                continue
            self.now = t
            self.processed += 1
            fn()
            if progress is not None and not self.processed & 0x3FF:
                progress(t)
