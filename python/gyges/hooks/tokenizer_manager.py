"""Hook on ``sglang.srt.managers.tokenizer_manager.TokenizerManager``: early rejection.

Under ``--enable-gyges`` a request whose need (prompt + max_new_tokens) exceeds the
largest instance the host can form (``max_tp`` x one replica's usable KV slots) or the
model's context length is refused in the HTTP process, before it is queued anywhere:
an AFTER hook on ``_validate_one_request`` raises ``ValueError``, which SGLang answers
with 400 on ``/generate`` and an OpenAI error object on ``/v1/*``.

The limits are attached to the tokenizer manager when the HTTP server starts (see
``gyges.hooks.http_server``), from the replica capacity the schedulers reported. The
same hook raises SGLang's tokenizer-side ``max_req_input_len`` (one replica's) to the
largest instance's; each scheduler's own caps follow its instance's capacity on every
merge and split (``gyges.switch.capacity.apply_degree``).
"""
from __future__ import annotations

from typing import Any

from gyges.config import GygesConfig
from gyges.control.metrics import count_rejection
from gyges.core.request_limits import RequestLimits

TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
ATTR = "_gyges_limits"


def install_limits(tokenizer_manager: Any, config: GygesConfig, scheduler_info: dict[str, Any],
                   page_size: int) -> RequestLimits:
    limits = RequestLimits(rank_capacity=int(scheduler_info["max_total_num_tokens"]),
                           max_tp=config.max_tp, page_size=page_size,
                           context_len=int(tokenizer_manager.context_len))
    setattr(tokenizer_manager, ATTR, limits)
    largest = limits.usable_at(limits.max_tp)
    # SGLang's formula (tp_worker.get_worker_info): min(context - 1, capacity - 1) - 5.
    raised = min(limits.context_len - 1, largest - 1) - 5  # type: ignore[operator]
    tokenizer_manager.max_req_input_len = max(tokenizer_manager.max_req_input_len or 0, raised)
    return limits


def after_validate_one_request(_result: None, tokenizer_manager: Any, obj: Any,
                               input_ids: Any, *args: Any, **kwargs: Any) -> None:
    limits: RequestLimits | None = getattr(tokenizer_manager, ATTR, None)
    if limits is None:
        return
    if input_ids is not None:
        prompt = len(input_ids)
    else:
        prompt = len(getattr(obj, "input_embeds", None) or ())
    if "Embedding" in type(obj).__name__:
        max_new: int | None = 0
    else:
        params = getattr(obj, "sampling_params", None) or {}
        preferred = getattr(tokenizer_manager, "preferred_sampling_params", None) or {}
        max_new = params.get("max_new_tokens", preferred.get("max_new_tokens"))
    message = limits.rejection(prompt, max_new)
    if message is not None:
        if tokenizer_manager.server_args.enable_metrics:
            count_rejection()
        raise ValueError(message)
