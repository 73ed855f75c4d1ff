"""Hook on ``sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator``.

Under ``--enable-gyges`` the MHA KV pool class resolves to
:class:`gyges.hooks.memory_pool.HeadMajorKVPool`, and every data-parallel replica's token
capacity is the smallest any replica profiled (``_apply_token_constraints``, where SGLang
itself syncs pipeline stages; :mod:`gyges.control.capacity_barrier`).
``_resolve_kv_pool_class`` is SGLang's own seam for a pool subclass that only changes how
storage is carved (what a platform's ``get_kv_pool_cls`` returns), and it is consulted at
every site an MHA pool is built.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Any

from gyges.control.capacity_barrier import agree_min, barrier_dir
from gyges.hooks.server_args import gyges_config

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
logger = logging.getLogger(__name__)
# The configurator is a slotted dataclass; rounds are counted per scheduler process (every
# replica sizes its pools in the same order).
_ROUNDS = itertools.count()


def around_resolve_kv_pool_class(original: Any, configurator: Any, *, kind: str,
                                 default: type) -> type:
    pool_cls = original(configurator, kind=kind, default=default)
    if kind != "mha":
        return pool_cls
    from sglang.srt.runtime_context import get_server_args

    if gyges_config(get_server_args()) is None:
        return pool_cls
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from gyges.hooks.memory_pool import HeadMajorKVPool

    if pool_cls is not MHATokenToKVPool:
        raise NotImplementedError(
            f"gyges: --enable-gyges replaces SGLang's MHATokenToKVPool with a head-major "
            f"pool, but this configuration selects {pool_cls.__name__}"
        )
    logger.info("Gyges: head-major KV pool (%s)", HeadMajorKVPool.__name__)
    return HeadMajorKVPool


def around_apply_token_constraints(original: Any, configurator: Any,
                                   token_capacity: int) -> int:
    capacity = original(configurator, token_capacity)
    from sglang.srt.runtime_context import get_parallel, get_server_args

    args = get_server_args()
    if gyges_config(args) is None or int(args.dp_size) <= 1 or configurator.is_draft_worker:
        return capacity
    # Replicas are children of one process (SGLang's DP controller); with the HTTP port
    # that names this launch of this host.
    key = f"{args.port}-{os.getppid()}"
    agreed = agree_min(barrier_dir(key), int(get_parallel().dp_rank or 0), int(args.dp_size),
                       capacity, next(_ROUNDS))
    if agreed != capacity:
        logger.info("Gyges: KV capacity %d -> %d tokens (the smallest replica's, so every "
                    "replica's pool has the same slots)", capacity, agreed)
    return agreed
