"""Hook on ``sglang.srt.managers.schedule_policy.SchedulePolicy``.

SGLang sorts the waiting queue by its policy before each prefill batch (``calc_priority``:
by prefix match, priority, ...). On a merged Gyges instance the requests only it can hold
were marked and put first (:mod:`gyges.switch.admission`); this keeps them first after the
sort. Without marks (no Gyges, or a TP1 replica) the queue is left as SGLang sorted it.
"""
from __future__ import annotations

from typing import Any

TARGET = "sglang.srt.managers.schedule_policy.SchedulePolicy"


def after_calc_priority(_result: Any, _policy: Any, waiting_queue: list[Any], *args: Any,
                        **kwargs: Any) -> None:
    from gyges.switch.admission import long_requests_first

    long_requests_first(waiting_queue)
    return None
