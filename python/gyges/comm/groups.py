"""Aligned groups of a host's ranks: enumeration and validation, engine-agnostic.

An aligned group of degree ``k`` is ``(k*m, ..., k*m + k - 1)``: the only groups that may
merge into one TP-k instance. With 4 ranks::

    degree 2:  (0, 1)  (2, 3)
    degree 4:  (0, 1, 2, 3)
"""
from __future__ import annotations

from collections.abc import Sequence

from gyges.control.channel import ControlError


def aligned_groups(num_ranks: int, degree: int) -> list[tuple[int, ...]]:
    """Every aligned group of ``degree`` ranks among ``0..num_ranks-1``, in rank order."""
    if degree < 1 or num_ranks % degree:
        raise ValueError(f"degree {degree} does not divide {num_ranks} ranks")
    return [tuple(range(s, s + degree)) for s in range(0, num_ranks, degree)]


def pool_degrees(max_tp: int) -> tuple[int, ...]:
    """The degrees the pool holds groups for: 2, 4, ..., max_tp (none when max_tp is 1)."""
    out, k = [], 2
    while k <= max_tp:
        out.append(k)
        k *= 2
    return tuple(out)


def group_of(rank: int, degree: int) -> tuple[int, ...]:
    """The aligned group of ``degree`` ranks that contains ``rank``."""
    start = rank - rank % degree
    return tuple(range(start, start + degree))


def validate_group(ranks: object, num_ranks: int, max_tp: int) -> tuple[int, ...]:
    """``ranks`` as a sorted tuple if they form an aligned group of degree 2..max_tp.

    Raises :class:`ControlError` (HTTP 400) with a message for the user otherwise. The
    merge API and the debug routes share this check.
    """
    if not isinstance(ranks, Sequence) or isinstance(ranks, str) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ranks
    ):
        raise ControlError("'ranks' must be a list of integers")
    if len(ranks) > num_ranks:
        raise ControlError(f"a group of {len(ranks)} ranks is larger than this host's "
                           f"{num_ranks} ranks")
    group = tuple(sorted(ranks))
    unknown = [r for r in group if not 0 <= r < num_ranks]
    if unknown:
        raise ControlError(f"unknown rank(s) {unknown}: this host has ranks 0..{num_ranks - 1}")
    if len(set(group)) != len(group):
        raise ControlError(f"ranks {list(group)} contain duplicates")
    k = len(group)
    if k < 2:
        raise ControlError(f"a group needs at least 2 ranks, got {list(group)}")
    if k not in pool_degrees(max_tp):
        raise ControlError(
            f"a group of {k} ranks is not allowed: the degree must be a power of two "
            f"between 2 and --gyges-max-tp {max_tp}"
        )
    if group != group_of(group[0], k):
        options = ", ".join(str(list(g)) for g in aligned_groups(num_ranks, k))
        raise ControlError(
            f"ranks {list(group)} are not an aligned group; aligned groups of {k} ranks "
            f"are {options}"
        )
    return group
