"""The radix cache across a merge or split: cached prefixes survive, renumbered by the same
plan that moves the KV.

A tree is exported as its nodes in a deterministic depth-first order (children sorted by
their first tokens), each with its parent's index, its tokens and its KV slots in the new
instance's slot space. The slots join the transfer plan's used ranges, so the KV under
every exported node moves with the requests' KV and nothing else moves. The installing
scheduler inserts the nodes' paths into its fresh tree (SGLang's ``insert``); a prefix
that two members both cached is kept once, the other copy's slots become free.

- **Merge**: each member exports its whole tree; the merged tree holds every member's
  cached prefixes.
- **Split**: a node goes to the half whose usable pages hold all of its slots, when its
  parent went there too; the others (pages straddling the halves, or below such a node)
  are dropped and counted.
"""
from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ORDER_TOKENS = 256


@dataclass
class CachedNode:
    """One radix-tree node: ``parent`` indexes the exported list (-1: the root)."""

    parent: int
    tokens: list[int]
    slots: torch.Tensor  # int64, one per token, in the receiving slot space
    extra_key: Any = None
    cache_salt: Any = None


def usable_tree(s: Any) -> Any:
    """The scheduler's radix tree if this module can walk it, else None (then, as before
    issue 13, only the running requests' prefixes survive). SGLang's unified radix cache
    walks with its Python tree core; ``--enable-gyges`` selects it (see
    ``hooks/server_args``), since the Rust core exposes no nodes."""
    tree = getattr(s, "tree_cache", None)
    if tree is None or getattr(tree, "disable", False) or not hasattr(tree, "insert"):
        return None
    try:
        _root(tree)
    except (AttributeError, NotImplementedError):
        return None
    return tree


def _root(tree: Any) -> Any:
    core = getattr(tree, "tree_core", None)
    return core.root_node if core is not None else tree.root_node


def _value(node: Any) -> torch.Tensor | None:
    """A node's device KV slots (None: evicted), for SGLang's RadixCache and the unified
    cache's Python tree core alike."""
    if hasattr(node, "component_data"):
        from sglang.srt.mem_cache.unified_cache.component_type import BASE_COMPONENT_TYPE

        return node.component_data[BASE_COMPONENT_TYPE].value
    return node.value


def export_tree(tree: Any, slot_offset: int = 0,
                keep: Callable[[torch.Tensor], bool] | None = None
                ) -> tuple[list[CachedNode], int, int]:
    """``(nodes, dropped_nodes, dropped_tokens)``: the tree's nodes, slots shifted by
    ``slot_offset``; with ``keep``, a node (and everything below it) whose slots ``keep``
    rejects is left out and counted."""
    out: list[CachedNode] = []
    dropped = [0, 0]
    if tree is None:
        return out, 0, 0

    # depth-first, parents before children, without recursion (a long multi-turn tree is
    # deep; a merge must not hit Python's recursion limit)
    stack: list[tuple[Any, int]] = [(_root(tree), -1)]
    while stack:
        node, parent = stack.pop()
        for child in reversed(sorted(node.children.values(), key=_order)):
            value = _value(child)
            if value is None:  # evicted to host (hierarchical cache): stop here
                continue
            slots = value.to("cpu", torch.int64)
            if keep is not None and not keep(slots):
                n, t = _size(child)
                dropped[0] += n
                dropped[1] += t
                continue
            out.append(CachedNode(parent, _tokens(child.key), slots + slot_offset,
                                  child.key.extra_key, child.key.cache_salt))
            stack.append((child, len(out) - 1))
    return out, dropped[0], dropped[1]


def import_tree(tree: Any, nodes: Sequence[CachedNode]) -> int:
    """Insert every node's path into ``tree`` (freed duplicates are the caller's, see
    :func:`tree_slots`); returns the number of tokens the tree did not hold yet."""
    if tree is None or not nodes:
        return 0
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    has_child = {n.parent for n in nodes}
    paths: list[tuple[list[int], list[torch.Tensor]]] = []
    added = 0
    for i, node in enumerate(nodes):
        toks, vals = ([], []) if node.parent < 0 else paths[node.parent]
        paths.append((toks + node.tokens, [*vals, node.slots]))
        if i in has_child:
            continue
        key_tokens, values = paths[i]
        key = RadixKey(array("q", key_tokens), node.extra_key, cache_salt=node.cache_salt)
        res = tree.insert(InsertParams(key=key, value=torch.cat(values)))
        added += len(key_tokens) - int(res.prefix_len)
    return added


def tree_slots(s: Any) -> torch.Tensor:
    """Every slot the scheduler's tree holds (they are not free)."""
    tree = getattr(s, "tree_cache", None)
    if tree is None or getattr(tree, "disable", False):
        return torch.empty(0, dtype=torch.int64)
    return tree.all_values_flatten().to("cpu", torch.int64)


def node_slots(nodes: Sequence[CachedNode]) -> torch.Tensor:
    return torch.cat([n.slots for n in nodes]) if nodes else torch.empty(0, dtype=torch.int64)


def _tokens(key: Any) -> list[int]:
    """A node key's tokens (SGLang's ``RadixKey``; a plain sequence in unit tests), without
    a Python step per token: a merge or split exports every cached token."""
    raw = getattr(key, "raw_token_ids", None)
    if raw is not None and not getattr(key, "is_bigram", False):
        return list(raw())  # a list or an array.array, depending on who built the key
    return [int(x) for x in key]


def _order(node: Any) -> tuple:
    """Siblings' order: they differ within their first page, so a head of the tokens is
    enough (a tie keeps the children dict's order, the same on every TP member)."""
    key = node.key
    return (str(key.extra_key), str(key.cache_salt), _tokens(key[:ORDER_TOKENS]))


def _size(node: Any) -> tuple[int, int]:
    """Nodes and tokens in the subtree under (and including) ``node``."""
    n = t = 0
    stack = [node]
    while stack:
        x = stack.pop()
        n, t = n + 1, t + len(x.key)
        stack.extend(x.children.values())
    return n, t


@dataclass
class SplitCache:
    """What a split does with a merged tree: ``halves[h]`` the nodes half h keeps (slots in
    its own space), ``slots`` / ``pages`` what they hold in the merged space (moved by the
    plan, reserved from page copies), and what is dropped."""

    halves: tuple[list[CachedNode], list[CachedNode]]
    slots: torch.Tensor
    pages: tuple[int, ...]
    dropped_nodes: int
    dropped_tokens: int

    def dropped_all(self) -> SplitCache:
        nodes = self.dropped_nodes + sum(len(h) for h in self.halves)
        tokens = self.dropped_tokens + sum(len(n.tokens) for h in self.halves for n in h)
        return SplitCache(([], []), torch.empty(0, dtype=torch.int64), (), nodes, tokens)


def split_cache(s: Any, k: int, slots_per_replica: int, page_size: int) -> SplitCache:
    """Assign the merged tree of scheduler ``s`` (degree ``k``) to the two halves."""
    from gyges.core.migration_plan import half_pages

    tree = usable_tree(s)
    width = (k // 2) * slots_per_replica
    halves: list[list[CachedNode]] = []
    held: list[torch.Tensor] = []
    for h in (0, 1):
        pages = half_pages(h, k, slots_per_replica // page_size)
        lo, hi = pages.start * page_size, pages.stop * page_size

        def inside(slots: torch.Tensor, lo: int = lo, hi: int = hi) -> bool:
            return bool(((slots >= lo) & (slots < hi)).all())

        nodes = export_tree(tree, -h * width, inside)[0]
        halves.append(nodes)
        held.append(node_slots(nodes) + h * width)
    slots = torch.cat(held)
    total = [0, 0]
    if tree is not None:
        for child in _root(tree).children.values():
            n, t = _size(child)
            total[0], total[1] = total[0] + n, total[1] + t
    kept_nodes = len(halves[0]) + len(halves[1])
    kept_tokens = sum(len(n.tokens) for h in halves for n in h)
    pages_held = tuple(torch.unique(slots // page_size).tolist())
    return SplitCache((halves[0], halves[1]), slots, pages_held, total[0] - kept_nodes,
                      total[1] - kept_tokens)
