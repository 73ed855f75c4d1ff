"""One rank's published load, in a module of its own so that the scheduler and the fleet
simulator can read it without importing the host controller's torch-based pieces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankLoad:
    """One rank's load as SGLang's scheduler last published it. ``total_tokens`` adds the
    prompts of waiting requests to ``used_tokens``; ``timestamp`` is the publish time
    (``time.time()``) so that requests dispatched after it can be accounted separately."""

    running: int = 0
    waiting: int = 0
    used_tokens: int = 0
    total_tokens: int = 0
    timestamp: float = 0.0
