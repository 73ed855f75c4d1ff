"""Hook on ``sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator``.

Under ``--enable-gyges`` the MHA KV pool class resolves to
:class:`gyges.hooks.memory_pool.HeadMajorKVPool`. ``_resolve_kv_pool_class`` is SGLang's own
seam for a pool subclass that only changes how storage is carved (what a platform's
``get_kv_pool_cls`` returns), and it is consulted at every site an MHA pool is built.
"""
from __future__ import annotations

import logging
from typing import Any

from gyges.hooks.server_args import gyges_config

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
logger = logging.getLogger(__name__)


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
