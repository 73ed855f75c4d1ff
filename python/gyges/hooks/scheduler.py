"""Hook on ``sglang.srt.managers.scheduler.Scheduler``.

Under ``--enable-gyges`` each scheduler process, before it starts serving, registers with
the host controller (rank, pid, KV layout, MLP storage, KV capacity), joins the host's
communicator pool (every aligned group it belongs to) and connects its command socket,
which it then polls without blocking once per event-loop iteration (``ingest_requests``):
commands run on the scheduler thread, between steps.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from gyges.comm.pool import CommunicatorPool, connect_store
from gyges.control.channel import Message, control_address, request
from gyges.control.commands import CommandClient, command_address
from gyges.hooks.server_args import gyges_config

TARGET = "sglang.srt.managers.scheduler.Scheduler"
# The routing key of a request the controller sends only to have it ended (its client
# aborted it while it was held for a transformation); SGLang's scheduler never reads it.
HELD_ABORT_MARK = "gyges:aborted-while-held"
logger = logging.getLogger(__name__)


def before_run_event_loop(scheduler: Any) -> None:
    if gyges_config(scheduler.server_args) is None:
        return
    from sglang.srt.runtime_context import get_parallel

    rank = get_parallel().dp_rank or 0
    hello = {
        "op": "hello",
        "rank": rank,
        "pid": os.getpid(),
        "kv_layout": kv_layout_of(scheduler),
        "mlp_storage": mlp_storage_of(scheduler),
        "capacity_tokens": int(scheduler.max_total_num_tokens),
    }
    ipc_name = scheduler.port_args_tokenizer_ipc_name
    address = control_address(ipc_name)
    # Connect first: the connection is up long before the controller's first command.
    commands = CommandClient(command_address(ipc_name), rank, {})
    reply = request(address, hello, timeout_s=120.0)
    if not reply.get("ok"):
        raise RuntimeError(f"gyges: controller refused rank {rank}: {reply.get('error')}")
    logger.info("Gyges: rank %d registered with the host controller", rank)
    pool = join_pool(rank, reply["pool"], str(scheduler.tp_worker.model_runner.device))
    commands.handlers["comm_check"] = lambda msg: comm_check(pool, msg)
    reply = request(address, {"op": "pool_ready", "rank": rank, "build_ms": pool.build_ms})
    if not reply.get("ok"):
        raise RuntimeError(f"gyges: pool_ready refused for rank {rank}: {reply.get('error')}")
    scheduler._gyges_pool = pool
    scheduler._gyges_commands = commands
    from gyges.switch.member import GroupMember  # scheduler processes only

    scheduler._gyges_member = GroupMember(scheduler, pool, commands)


def join_pool(rank: int, info: Message, device: str) -> CommunicatorPool:
    """Build this rank's pooled groups for ``device`` (its payload groups); blocks until
    every rank of the host has joined."""
    pool = CommunicatorPool.build(connect_store(int(info["store_port"])), rank,
                                  int(info["world_size"]), int(info["max_tp"]),
                                  device=device.split(":")[0])
    logger.info("Gyges: rank %d communicator pool ready: groups %s built and verified in "
                "%.1f ms", rank, sorted(pool.groups), pool.build_ms)
    return pool


def comm_check(pool: CommunicatorPool, msg: Message) -> Message:
    check = pool.check(tuple(msg["ranks"]), float(msg.get("timeout_s", 10.0)))
    return {"result": check.result, "elapsed_ms": check.elapsed_ms}


def after_ingest_requests(received: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Once per event-loop iteration: end the requests the controller sent marked aborted,
    then run pending controller commands (non-blocking on a TP1 rank; a merged instance's
    leader relays them to its followers)."""
    _abort_marked(scheduler, received or ())
    member = getattr(scheduler, "_gyges_member", None)
    if member is not None:
        member.poll()


def _abort_marked(scheduler: Any, received: Any) -> None:
    """A request its client aborted while the controller held it arrives marked
    (``routing_key`` is :data:`HELD_ABORT_MARK`); it is ended from the waiting queue before
    this iteration's step, so it is answered unserved. Every rank of an instance receives
    the same requests, so every rank ends it."""
    from sglang.srt.managers.io_struct import AbortReq

    for recv in received:
        for req in type(scheduler)._tokenized_requests(recv):
            if getattr(req, "routing_key", None) == HELD_ABORT_MARK:
                logger.info("gyges: request %s arrived aborted (its client aborted it while "
                            "it was held for a transformation): ended unserved", req.rid)
                scheduler.abort_request(AbortReq(rid=req.rid))


def before_get_new_batch_prefill(scheduler: Any, running_batch: Any, *args: Any,
                                 **kwargs: Any) -> None:
    """On a merged instance, before SGLang forms a prefill batch: the waiting requests one
    replica could not hold go first, and short running requests are retracted until the
    first of them fits (:mod:`gyges.switch.admission`)."""
    member = getattr(scheduler, "_gyges_member", None)
    if member is None or member.tp == 1 or not scheduler.waiting_queue:
        return None
    from gyges.switch.admission import make_room

    member.retracted_for_long += len(make_room(scheduler, running_batch,
                                               member.replica_usable))
    return None


def after_is_disable_overlap_for_batch(result: bool, scheduler: Any, batch: Any = None,
                                       last_batch: Any = None) -> bool | None:
    """Once after a transformation, under the overlap scheduler: process the first step's
    result before launching the second, as SGLang itself does for consecutive prefills.

    A switch settles the step in flight, so the new configuration restarts the overlap
    pipeline: its first tokens would only be processed after the second step was launched,
    which on CPU runs the whole step. Processing them first takes one step off the pause
    every stream sees; the batches and their order are SGLang's own path."""
    member = getattr(scheduler, "_gyges_member", None)
    if result or member is None or batch is None or last_batch is None or \
            not member.flush_after_switch:
        return None
    member.flush_after_switch = False
    logger.info("Gyges: rank %d processes the first step after the switch before launching "
                "the next", member.rank)
    return True


def after_send_control_output(_result: Any, scheduler: Any, output: Any,
                              recv_req: Any = None) -> None:
    """A merged instance's leader answers each fanned-out control request once per member.

    The tokenizer counts one reply per DP rank; the controller sends control requests to
    leaders only and followers have no output socket, so the leader's reply stands in
    for its followers' (same content: the members' state is identical).
    """
    member = getattr(scheduler, "_gyges_member", None)
    if member is None:
        return
    for _ in range(member.extra_control_replies):
        scheduler.ipc_channels.send_to_tokenizer.send_output(output, recv_req)


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
