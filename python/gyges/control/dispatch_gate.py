"""Which ranks the DP controller may send work to, engine-agnostic.

The DP controller's main thread dispatches requests; the host controller's control thread
transforms groups. A :class:`DispatchGate` is shared by both under one lock:

- a rank under transformation is *paused*: no new request goes to it; a request that has
  nowhere else to go is *held* and sent when the transformation ends. Control messages
  (which SGLang fans out to every replica and whose replies the tokenizer counts) are held
  while any transformation runs;
  Aborts (``NEVER_HELD``) are never held: they go to every leader, paused ones included;
- a *follower* of a merged instance never receives anything: its leader receives the
  instance's requests and broadcasts them (SGLang's own TP path), and answers control
  messages once per member.

The gate only decides; the SGLang hook applies its decisions (``status`` flags, held calls).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

NEVER_HELD = ("AbortReq",)  # control message types that pass a paused gate (no replies)


class DispatchGate:
    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.lock = threading.RLock()
        self.paused: frozenset[int] = frozenset()
        self.leader_of: dict[int, int] = {}  # follower -> its instance's leader
        self._held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    # -- state (call with the lock held) --------------------------------------------------

    def receives(self, rank: int) -> bool:
        """Whether ``rank`` may be sent new work now."""
        return rank not in self.paused and rank not in self.leader_of

    def status(self) -> list[bool]:
        """SGLang's ``DataParallelController.status`` flags for this state."""
        return [self.receives(r) for r in range(self.num_ranks)]

    def pause(self, ranks: Iterable[int]) -> None:
        self.paused = self.paused | frozenset(ranks)

    def resume(self, ranks: Iterable[int]) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """Un-pause ``ranks``; return the held calls that may now run (in arrival order)."""
        self.paused = self.paused - frozenset(ranks)
        if self.paused or not any(self.status()):
            return []
        held, self._held = self._held, []
        return held

    def set_instance(self, ranks: tuple[int, ...]) -> None:
        """Record that ``ranks`` now form one instance led by ``ranks[0]``."""
        for r in ranks:
            self.leader_of.pop(r, None)
        for r in ranks[1:]:
            self.leader_of[r] = ranks[0]

    # -- decisions ------------------------------------------------------------------------

    def route_to(self, rank: int | None) -> int | None:
        """Where a request pinned to ``rank`` goes: its instance's leader (None: unpinned)."""
        return None if rank is None else self.leader_of.get(rank, rank)

    def must_hold_request(self, pinned: int | None) -> bool:
        if pinned is not None:
            return pinned in self.paused
        return not any(self.status())

    def must_hold_control(self) -> bool:
        return bool(self.paused)

    def control_targets(self) -> list[int]:
        """Where a never-held message (an abort) goes: every instance's leader, paused
        ones included (a request being drained must still be abortable)."""
        return [r for r in range(self.num_ranks) if r not in self.leader_of]

    def hold(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._held.append((fn, args))

    @property
    def num_held(self) -> int:
        return len(self._held)
