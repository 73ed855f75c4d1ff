"""Radix trees carried across a merge and a split (SGLang's own RadixCache, no pools):
every cached prefix lands in the merged tree with renumbered slots; a split gives each
node to the half holding all its pages and counts the ones it drops."""
from __future__ import annotations

from array import array
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from gyges.switch import prefix_cache

S = 64  # slots per replica


def _tree(page: int = 1) -> RadixCache:
    return RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                      token_to_kv_pool_allocator=None, page_size=page))


def _insert(tree: RadixCache, tokens: list[int], slots: list[int]) -> None:
    tree.insert(InsertParams(key=RadixKey(array("q", tokens)),
                             value=torch.tensor(slots, dtype=torch.int64)))


def _match(tree: RadixCache, tokens: list[int]) -> list[int]:
    res = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    path = tree.path_device_indices(res.last_device_node).tolist()
    return path[:res.device_prefix_len]


def _contents(tree: RadixCache) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Every root-to-leaf path: tokens -> slots."""
    out = {}
    stack = [(tree.root_node, (), ())]
    while stack:
        node, toks, slots = stack.pop()
        if not node.children:
            if toks:
                out[toks] = slots
            continue
        for c in node.children.values():
            stack.append((c, toks + tuple(int(x) for x in c.key),
                          slots + tuple(c.value.tolist())))
    return out


def test_merge_keeps_every_members_prefixes_renumbered():
    a, b = _tree(), _tree()
    _insert(a, [1, 2, 3, 4], [1, 2, 3, 4])
    _insert(a, [1, 2, 9], [1, 2, 7])
    _insert(b, [1, 2, 3, 4, 5], [10, 11, 12, 13, 14])  # same prefix on the other replica
    _insert(b, [8, 8], [20, 21])
    merged = _tree()
    for member, tree in enumerate((a, b)):
        nodes, dropped, _ = prefix_cache.export_tree(tree, member * S)
        assert dropped == 0
        prefix_cache.import_tree(merged, nodes)
    assert _match(merged, [1, 2, 3, 4, 5]) == [1, 2, 3, 4, S + 14]
    assert _match(merged, [1, 2, 9]) == [1, 2, 7]
    assert _match(merged, [8, 8]) == [S + 20, S + 21]
    held = set(prefix_cache.tree_slots(SimpleNamespace(tree_cache=merged)).tolist())
    assert held == {1, 2, 3, 4, 7, S + 14, S + 20, S + 21}  # b's copy of 1..4 is free


def test_split_gives_nodes_to_the_half_holding_their_pages():
    k, page = 2, 2
    merged = _tree(page)
    _insert(merged, [1, 2, 3, 4], [2, 3, 4, 5])             # half 0
    _insert(merged, [7, 7, 7, 7], [S + 4, S + 5, S + 6, S + 7])  # half 1
    _insert(merged, [5, 5, 6, 6], [8, 9, S + 8, S + 9])     # straddles: dropped
    _insert(merged, [9, 9], [S, S + 1])  # half 1's first page pads the new instance
    s = SimpleNamespace(tree_cache=merged)
    cache = prefix_cache.split_cache(s, k, S, page)
    assert [(n.tokens, n.slots.tolist()) for n in cache.halves[0]] == [([1, 2, 3, 4],
                                                                        [2, 3, 4, 5])]
    assert [(n.tokens, n.slots.tolist()) for n in cache.halves[1]] == [([7, 7, 7, 7],
                                                                        [4, 5, 6, 7])]
    assert (cache.dropped_nodes, cache.dropped_tokens) == (2, 6)
    assert cache.pages == (1, 2, (S + 4) // page, (S + 6) // page)
    assert cache.dropped_all().dropped_tokens == 14


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=8), min_size=1,
                max_size=12))
def test_export_import_round_trip(seqs):
    tree, nxt = _tree(), 1
    for seq in seqs:
        have = len(_match(tree, seq))
        _insert(tree, seq, _match(tree, seq) + list(range(nxt, nxt + len(seq) - have)))
        nxt += len(seq) - have
    copy = _tree()
    nodes, _, _ = prefix_cache.export_tree(tree, 100)
    prefix_cache.import_tree(copy, nodes)
    want = {t: tuple(x + 100 for x in v) for t, v in _contents(tree).items()}
    assert _contents(copy) == want
