"""A request's token need (prompt + max new tokens) from its JSON body.

Token-id lists count exactly. Text is counted exactly with the model's tokenizer when the
router is given one (``--tokenizer-path``; chat messages through its chat template), else
estimated as `len(text) / chars_per_token` (4 fits English BPE). For a batch (/generate with a
list of prompts) the need of its largest member is returned: that decides where the batch fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# SGLang's defaults: SamplingParams.max_new_tokens = 128, CompletionRequest.max_tokens = 16.
# Chat requests without a limit may run to the context length; 128 is the router's guess.
DEFAULT_MAX_NEW_TOKENS = {"/generate": 128, "/v1/completions": 16, "/v1/chat/completions": 128}
CHAT_TOKENS_PER_MESSAGE = 4  # role markers of a chat template


class TokenizerError(ValueError):
    """The tokenizer path cannot be loaded (a startup error of the router)."""


def load_tokenizer(path: str) -> Any:
    """The tokenizer at `path` (a local directory, or a hub id reachable from here)."""
    import os

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
    except Exception as e:  # noqa: BLE001 - any failure to load is the same startup error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load the tokenizer at {path!r}: {first}") from e


@dataclass(frozen=True)
class NeedEstimator:
    """Estimates `need` = prompt tokens + max new tokens of one request."""

    chars_per_token: float = 4.0
    tokenizer: Any = None  # a Hugging Face tokenizer: exact text lengths

    def text_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return math.ceil(len(text) / self.chars_per_token)

    def prompt_tokens(self, prompt: Any) -> list[int]:
        """Token counts of the prompts in `prompt` (str, ids, or a batch of either)."""
        if isinstance(prompt, str):
            return [self.text_tokens(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(x, int) for x in prompt):
                return [len(prompt)]
            return [n for p in prompt for n in self.prompt_tokens(p)]
        return [0]

    def chat_tokens(self, messages: Any) -> int:
        if not isinstance(messages, list):
            return 0
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            try:
                ids = self.tokenizer.apply_chat_template(messages, tokenize=True,
                                                         add_generation_prompt=True)
                if not isinstance(ids, list):  # a BatchEncoding (newer transformers)
                    ids = ids["input_ids"]
                return len(ids)
            except Exception:  # noqa: BLE001 - odd messages: count them part by part
                pass
        total = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += CHAT_TOKENS_PER_MESSAGE
            content = message.get("content")
            if isinstance(content, str):
                total += self.text_tokens(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += self.text_tokens(part["text"])
        return total

    def estimate(self, path: str, body: dict[str, Any]) -> int:
        """Need in tokens of a request to `path` with JSON `body` (largest batch member)."""
        default = DEFAULT_MAX_NEW_TOKENS.get(path, 128)
        if path == "/generate":
            if body.get("input_ids") is not None:
                prompts = self.prompt_tokens(body["input_ids"])
            else:
                prompts = self.prompt_tokens(body.get("text"))
            params = body.get("sampling_params")
            if isinstance(params, list):  # one dict per batch member
                limits = [_int(p.get("max_new_tokens"), default) for p in params if _is_dict(p)]
                new = max(limits, default=default)
            else:
                new = _int(params.get("max_new_tokens"), default) if _is_dict(params) else default
            return max(prompts) + new
        if path == "/v1/chat/completions":
            new = _int(body.get("max_completion_tokens"), _int(body.get("max_tokens"), default))
            return self.chat_tokens(body.get("messages")) + new
        new = _int(body.get("max_tokens"), default)
        return max(self.prompt_tokens(body.get("prompt"))) + new


def _int(value: Any, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)
