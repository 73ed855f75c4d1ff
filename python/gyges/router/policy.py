"""Placement policies: pure functions from status snapshots to a chosen worker (no I/O).

The router asks a policy where one request of `need` tokens (prompt + max new tokens) should go,
given one `HostView` per candidate worker. A `HostView` pairs the worker's last `/gyges/status`
snapshot (None for a stock SGLang server) with the router's own book-keeping of the requests it
has sent there: a snapshot is a few hundred ms old, so requests dispatched after it was taken are
passed in as "pending" and counted against the snapshot's free capacity.

Gyges policy, per request (see docs/router.md):
  * a request is *long* on a host when need > the host's TP1 instance capacity;
  * load first: the host with the fewest requests outstanding from this router (the
    least-load order), so prefills spread over the fleet;
  * short: among equally loaded hosts, fewest outstanding tokens, then free TP1 capacity (as
    below), then rotation;
  * long: among equally loaded hosts, a merged instance that has room and serves fewer
    requests than it has ranks, else a host where a merge is already under way for earlier
    long requests and the new one fits beside them, else the host whose cheapest aligned
    group (least KV tokens to move) can be merged, preferring on equal cost a host that is
    already transformed or took long requests lately; if no group can be merged anywhere,
    the host with the least long work queued;
  * why load first, and why a busy merged instance does not draw more long requests: with
    gyges.sim, gathering long requests on few merged hosts queued their multi-second
    prefills behind each other (Llama-3-70B, Mooncake, 8 hosts of 8 H100: goodput 1.31
    req/s against 2.40 for least-load; 2.60 with this order, docs/simulator.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("gyges", "round_robin", "least_load")


@dataclass(frozen=True)
class InstanceStatus:
    """One serving instance of a Gyges host (a TP group of `tp` ranks)."""

    ranks: tuple[int, ...]
    tp: int
    leader: int
    capacity_tokens: int
    used_tokens: int
    running: int
    waiting: int

    @property
    def free_tokens(self) -> int:
        return max(0, self.capacity_tokens - self.used_tokens)


@dataclass(frozen=True)
class HostStatus:
    """A parsed `GET /gyges/status` snapshot of one host."""

    kv_layout: str
    mlp_storage: str
    max_tp: int
    dp_size: int
    max_request_tokens: int
    instances: tuple[InstanceStatus, ...]

    @property
    def tp1_capacity(self) -> int:
        """KV capacity of one rank's replica (a TP-k instance holds k of them): a TP1
        instance's if there is one, else the host's max request over max TP (a merged
        instance whose members grew their KV into released MLP memory holds more than k
        replicas, so capacity / tp would overstate a replica; found with gyges.sim)."""
        tp1 = [i.capacity_tokens for i in self.instances if i.tp == 1]
        if tp1:
            return max(tp1)
        per_rank = max((i.capacity_tokens // max(1, i.tp) for i in self.instances), default=0)
        if self.max_tp > 0 and self.max_request_tokens > 0:
            return min(per_rank, self.max_request_tokens // self.max_tp)
        return per_rank

    @property
    def has_merged(self) -> bool:
        return any(i.tp > 1 for i in self.instances)

    @property
    def queued(self) -> int:
        return sum(i.running + i.waiting for i in self.instances)


@dataclass(frozen=True)
class HostView:
    """What a policy sees of one worker.

    pending_*: tokens of requests this router sent after `status` was taken (not in it yet).
    released_*: tokens of requests that finished after `status` was taken (still in it).
    outstanding_long_tokens: all long requests sent there and not finished.
    """

    worker_id: str
    status: HostStatus | None
    outstanding_requests: int = 0
    outstanding_tokens: int = 0
    pending_short_tokens: int = 0
    pending_long_tokens: int = 0
    outstanding_long_tokens: int = 0
    released_short_tokens: int = 0
    released_long_tokens: int = 0
    recent_long: bool = False  # this router sent it a long request lately


@dataclass(frozen=True)
class Placement:
    """A policy's answer: the worker, whether the request is long there, and why."""

    worker_id: str
    long: bool
    reason: str


def is_long(need: int, status: HostStatus | None) -> bool:
    """True when `need` tokens do not fit one TP1 replica of the host (False if unknown)."""
    return status is not None and need > status.tp1_capacity


def merge_degree(tokens: int, status: HostStatus) -> int | None:
    """Smallest power-of-two degree whose instance capacity holds `tokens`, or None."""
    cap, limit = status.tp1_capacity, min(status.max_tp, status.dp_size)
    k = 1
    while k <= limit:
        if k * cap >= tokens:
            return k
        k *= 2
    return None


def merge_costs(k: int, status: HostStatus) -> list[int]:
    """KV tokens held by each aligned group of k ranks that can still be merged to degree k.

    A group qualifies when every instance touching it lies inside it and is smaller than k
    (a group already at degree >= k gains nothing by merging). Sorted ascending.
    """
    costs = []
    for start in range(0, status.dp_size - k + 1, k):
        group = set(range(start, start + k))
        members = [i for i in status.instances if group & set(i.ranks)]
        if all(set(i.ranks) <= group and i.tp < k for i in members):
            costs.append(sum(i.used_tokens for i in members))
    return sorted(costs)


def unmerged_long_tokens(view: HostView) -> int:
    """Long-request tokens sent to the host that its snapshot does not show merged yet."""
    if view.status is not None and view.status.has_merged:
        return view.pending_long_tokens
    return view.outstanding_long_tokens


def _largest_degree(status: HostStatus) -> int:
    k = 1
    while k * 2 <= min(status.max_tp, status.dp_size):
        k *= 2
    return k


def _reserved_degree(underway: int, status: HostStatus) -> int:
    """Ranks presumed taken by a merge under way for `underway` long-request tokens."""
    if not underway:
        return 0
    return merge_degree(underway, status) or _largest_degree(status)


def _gyges_key(need: int, view: HostView) -> tuple[tuple[int, ...], bool, str]:
    """Rank of one host for one request (lower is better), whether it is long there, why.

    Classes: 0 short with TP1 room, 1 long with merged room, 2 long joining a merge under way,
    3 short without TP1 room, 4 long needing a fresh merge, 5 long waiting, 6 no status
    (stock server), 7 larger than the host's max_request_tokens.
    """
    s = view.status
    if s is None:
        return (6, view.outstanding_requests, view.outstanding_tokens), False, "no-status"
    long = need > s.tp1_capacity
    if need > s.max_request_tokens:
        return (7, -s.max_request_tokens), long, "exceeds-max-request"
    underway = unmerged_long_tokens(view)
    k_underway = _reserved_degree(underway, s)
    queue = s.queued + view.outstanding_requests
    if not long:
        reserved = k_underway * s.tp1_capacity
        tp1_free = sum(i.free_tokens for i in s.instances if i.tp == 1)
        delta = view.released_short_tokens - view.pending_short_tokens - reserved
        free = tp1_free + delta
        if free >= need:
            return (0, -free, queue), False, "tp1-free"
        any_free = sum(i.free_tokens for i in s.instances) + delta
        return (3, -any_free, queue), False, "tp1-busy"
    # A merged instance already serving as many requests as it has ranks would queue this
    # prefill behind theirs: merging a fresh group is faster than sharing it.
    room = max((i.free_tokens for i in s.instances if 1 < i.tp and i.running + i.waiting < i.tp),
               default=0)
    room += view.released_long_tokens - view.pending_long_tokens
    if room >= need:
        return (1, -room, queue), True, "merged-room"
    if underway and underway + need <= k_underway * s.tp1_capacity:
        return (2, underway, queue), True, f"merge-underway-tp{k_underway}"
    k = merge_degree(need, s)
    costs = merge_costs(k, s) if k is not None else []
    if underway and k is not None:  # the cheapest groups are presumably being merged already
        costs = costs[max(1, k_underway // k) :]
    if costs:  # equal costs: prefer a host already transformed (or that took long requests
        # lately and may have split back since), so few hosts lose TP1 capacity
        fresh = 0 if (s.has_merged or underway or view.recent_long) else 1
        return (4, costs[0], fresh, k or 0, queue), True, f"merge-tp{k}-cost{costs[0]}"
    # Nothing can be merged now: wait where the least long work is queued ahead of it.
    return (5, view.outstanding_long_tokens, queue), True, "wait-for-merged-room"


def place_gyges(need: int, hosts: Sequence[HostView], counter: int = 0) -> Placement | None:
    """Gyges placement; least-load when no host reports a status.

    Ties: a long request goes to the first tied host (so long requests gather on few hosts), a
    short one to the tied host `counter` positions on (so idle hosts share short requests).
    """
    if not hosts:
        return None
    if all(h.status is None for h in hosts):
        return place_least_load(need, hosts, counter)
    n, ranked = len(hosts), []
    for index, view in enumerate(hosts):
        key, long, reason = _gyges_key(need, view)
        # Load first; a host too small for the request (class 7) stays last whatever its load.
        tokens = 0 if long else view.outstanding_tokens
        key = (key[0] == 7, view.outstanding_requests, tokens, *key)
        ranked.append((key, index if long else (index - counter) % n, index, long, reason))
    *_, index, long, reason = min(ranked)
    return Placement(hosts[index].worker_id, long, reason)


def place_least_load(need: int, hosts: Sequence[HostView], counter: int = 0) -> Placement | None:
    """Fewest outstanding requests (then tokens) sent by this router; ties rotate by `counter`."""
    if not hosts:
        return None
    n = len(hosts)
    index = min(
        range(n),
        key=lambda i: (
            hosts[i].outstanding_requests,
            hosts[i].outstanding_tokens,
            (i - counter) % n,
        ),
    )
    view = hosts[index]
    return Placement(view.worker_id, is_long(need, view.status), "least-load")


def place_round_robin(need: int, hosts: Sequence[HostView], counter: int) -> Placement | None:
    """The `counter`-th host, cyclically."""
    if not hosts:
        return None
    view = hosts[counter % len(hosts)]
    return Placement(view.worker_id, is_long(need, view.status), "round-robin")


def place(policy: str, need: int, hosts: Sequence[HostView], counter: int = 0) -> Placement | None:
    """Dispatch to the named policy; None when `hosts` is empty."""
    if policy == "gyges":
        return place_gyges(need, hosts, counter)
    if policy == "least_load":
        return place_least_load(need, hosts, counter)
    if policy == "round_robin":
        return place_round_robin(need, hosts, counter)
    raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
