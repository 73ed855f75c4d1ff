"""Room for a request only a merged instance can hold: which running requests to retract.

Engine-agnostic. A merged instance exists because some request needs more KV than one
replica holds (a *long* request). The requests that moved in with the merge can hold the
merged pool so that the long request waits until they finish, although each of them could
run on one replica. SGLang preempts running requests for a waiting one only under priority
scheduling and only when the batch is full by request count, never for KV tokens. So a
merged instance retracts *short* running requests (those one replica could hold; SGLang's
own retraction: their KV is freed, they wait again and are recomputed) until the long
request fits. Long running requests are never retracted (nothing else can hold them), nor
requests whose state SGLang's retraction does not keep (the engine side says which).

Bounded: a request already retracted ``max_retractions`` times (one by default) is kept.
Each retraction redoes the request's prefill; unbounded, an overloaded merged instance
whose queue holds many long requests retracts the same short ones again and again (in the
simulator, Qwen2.5-32B on one 8-GPU host of the Mooncake conversation trace: 3896
retractions and less throughput than never retracting, ``benchmark/sim_long_first.py``).

Order: the fewest output tokens first (the least decoding redone), then the latest in the
batch. Every rank of the instance computes the same plan from the same state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Running:
    """One running request as the plan sees it.

    ``held``: KV slots it holds; ``reserved``: slots the admission check sets aside for its
    remaining output; ``progress``: output tokens so far; ``keep``: never retracted (one
    replica could not hold it, or a retraction would change its output); ``retracted``:
    how many times it was retracted before (for any reason)."""

    index: int  # position in the running batch
    held: int
    reserved: int
    progress: int
    keep: bool = False
    retracted: int = 0


def plan_retraction(shortfall: int, running: Sequence[Running],
                    max_retractions: int = 1) -> list[int] | None:
    """Indices of the running requests to retract so that at least ``shortfall`` slots come
    free (each frees what it holds and what is reserved for it). Only short requests
    retracted fewer than ``max_retractions`` times before are candidates.

    ``[]`` when ``shortfall <= 0``. ``None`` when retracting every candidate would not
    free enough: then none is retracted (the long request waits, as it would anyway)."""
    if shortfall <= 0:
        return []
    short = sorted((r for r in running if not r.keep and r.retracted < max_retractions),
                   key=lambda r: (r.progress, -r.index))
    chosen: list[int] = []
    for r in short:
        chosen.append(r.index)
        shortfall -= max(r.held, 0) + max(r.reserved, 0)
        if shortfall <= 0:
            return sorted(chosen)
    return None
