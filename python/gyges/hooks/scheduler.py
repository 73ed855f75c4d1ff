"""Hook on ``sglang.srt.managers.scheduler.Scheduler``.

Under ``--enable-gyges`` each scheduler process registers with the host controller
before it starts serving (its rank, pid, KV layout, MLP storage and KV capacity).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from gyges.control.channel import request
from gyges.hooks.server_args import gyges_config

TARGET = "sglang.srt.managers.scheduler.Scheduler"
logger = logging.getLogger(__name__)


def before_run_event_loop(scheduler: Any) -> None:
    if gyges_config(scheduler.server_args) is None:
        return
    from sglang.srt.runtime_context import get_parallel

    from gyges.control.channel import control_address

    rank = get_parallel().dp_rank or 0
    hello = {
        "op": "hello",
        "rank": rank,
        "pid": os.getpid(),
        "kv_layout": kv_layout_of(scheduler),
        "mlp_storage": mlp_storage_of(scheduler),
        "capacity_tokens": int(scheduler.max_total_num_tokens),
    }
    address = control_address(scheduler.port_args_tokenizer_ipc_name)
    reply = request(address, hello, timeout_s=120.0)
    if not reply.get("ok"):
        raise RuntimeError(f"gyges: controller refused rank {rank}: {reply.get('error')}")
    logger.info("Gyges: rank %d registered with the host controller", rank)


def kv_layout_of(scheduler: Any) -> str:
    pool = scheduler.tp_worker.model_runner.token_to_kv_pool
    return getattr(pool, "gyges_kv_layout", "token_major")


def mlp_storage_of(scheduler: Any) -> str:
    model = scheduler.tp_worker.model_runner.model
    return getattr(model, "gyges_mlp_storage", "dense")


def after_init_ipc_channels(_result: None, scheduler: Any, port_args: Any) -> None:
    # The DP controller gives each replica its own PortArgs but they all share the
    # tokenizer's IPC name, from which the control address is derived.
    scheduler.port_args_tokenizer_ipc_name = port_args.tokenizer_ipc_name
