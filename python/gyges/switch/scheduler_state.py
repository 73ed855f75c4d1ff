"""The scheduler-process state a TP switch changes, outside the model and the KV pool.

SGLang reads the TP size, rank and group from the process-global parallel context
(``get_parallel()``) at call time in some places and caches them at init in others
(../shared/SGLANG_TP_SWITCH.md sections 1 and 4). :func:`apply_tp` stamps the context
permanently and re-points every cached copy; :func:`restore_tp1` puts the boot values back.
Followers also stop talking to the tokenizer and detokenizer (their output sockets are
set to None, SGLang's own convention for non-zero TP ranks) and stop reading requests
(SGLang gates the pull on ``attn_tp_rank == 0``); the leader receives and broadcasts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sglang.srt.runtime_context import get_parallel

# moe_tp_group: where SGLang's layer boundary sums a mixture of experts' partials
# (post_experts_reduction_group), so MoE models reduce over the merged group too.
_STAMPED = ("tp_size", "tp_rank", "tp_group", "attn_tp_size", "attn_tp_rank",
            "attn_tp_group", "moe_tp_size", "moe_tp_rank", "moe_tp_group")


@dataclass(frozen=True)
class Tp1State:
    """What a scheduler looked like at boot (TP1), to return to on split."""

    parallel: dict[str, Any]
    tokenizer_socket: Any
    detokenizer_socket: Any

    @classmethod
    def capture(cls, scheduler: Any) -> Tp1State:
        p = get_parallel()
        ipc = scheduler.ipc_channels
        return cls({n: getattr(p, n) for n in _STAMPED if _readable(p, n)},
                   ipc.send_to_tokenizer.socket, ipc.send_to_detokenizer.socket)


def _readable(p: Any, name: str) -> bool:
    try:
        getattr(p, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def apply_tp(scheduler: Any, group: Any, k: int, r: int, boot: Tp1State) -> None:
    """Stamp TP-``k`` local rank ``r`` over ``group`` and re-point the scheduler's caches."""
    get_parallel().override_permanently(
        tp_size=k, tp_rank=r, tp_group=group, attn_tp_size=k, attn_tp_rank=r,
        attn_tp_group=group, moe_tp_size=k, moe_tp_rank=r, moe_tp_group=group)
    _repoint(scheduler, group, k)
    ipc = scheduler.ipc_channels
    leader = r == 0
    ipc.send_to_tokenizer.socket = boot.tokenizer_socket if leader else None
    ipc.send_to_detokenizer.socket = boot.detokenizer_socket if leader else None


def restore_tp1(scheduler: Any, boot: Tp1State) -> None:
    get_parallel().override_permanently(**boot.parallel)
    _repoint(scheduler, boot.parallel["tp_group"], 1)
    ipc = scheduler.ipc_channels
    ipc.send_to_tokenizer.socket = boot.tokenizer_socket
    ipc.send_to_detokenizer.socket = boot.detokenizer_socket


def _repoint(s: Any, group: Any, k: int) -> None:
    """Every copy of the TP group / size SGLang cached at init (pure TP, no attention DP)."""
    s.tp_group, s.tp_cpu_group = group, group.cpu_group
    s.attn_tp_group, s.attn_tp_cpu_group = group, group.cpu_group
    s.dp_tp_group, s.dp_tp_cpu_group = group, group.cpu_group
    s.tp_size = k
    runner = s.tp_worker.model_runner
    runner.sampler.tp_sync_group = group.device_group
    if getattr(s, "weight_updater", None) is not None:
        s.weight_updater.tp_cpu_group = group.cpu_group
    if getattr(s, "profiler_manager", None) is not None:
        s.profiler_manager.dp_tp_cpu_group = group.cpu_group
    gm = getattr(s, "grammar_manager", None)
    if gm is not None and hasattr(gm, "grammar_sync_group"):
        gm.grammar_sync_group = group.cpu_group
        gm.grammar_sync_size = group.world_size
        gm.grammar_sync_entry = group.first_rank
        gm.is_grammar_sync_entry = group.is_first_rank
