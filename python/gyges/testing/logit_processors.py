"""Custom logit processors for tests: importable by the server, so SGLang's dill-serialised
form (``to_str()``) refers to them by module."""
from __future__ import annotations

from typing import Any

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class NoRepeatLastToken(CustomLogitProcessor):
    """Forbids each request's previous output token and the ids in ``banned``; reads the
    request through ``custom_params["__req__"]`` (the reference a migration must restore)."""

    def __call__(self, logits: torch.Tensor,
                 custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        for i, params in enumerate(custom_param_list or []):
            if not params:
                continue
            req = params["__req__"]
            if req.output_ids:
                logits[i, req.output_ids[-1]] = -float("inf")
            for t in params.get("banned", ()):
                logits[i, t] = -float("inf")
        return logits
