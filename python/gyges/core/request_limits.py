"""How many KV slots a request needs, and the largest request a host can ever serve.

Engine-agnostic. A request's *need* is its prompt length plus its ``max_new_tokens`` (the
KV slots it holds when it finishes). SGLang clips a request on an instance of ``C`` slots
(page size ``P``) unless

    prompt + max_new <= C - 2        (max_req_len = C - 1, one slot left for the next token)
    ceil_P(prompt) + max_new <= C - P - 1   (one page reserved by the allocator)

so the *usable* slots of an instance are ``C - slack`` with ``slack = max(2 * P, 8)``: a
request whose need fits them runs exactly as on a replica large enough for it.
"""
from __future__ import annotations

from dataclasses import dataclass

# SGLang's SamplingParams.max_new_tokens default; a request that sets no limit (None, e.g.
# an OpenAI chat request without max_tokens) is placed as if it asked for this many.
DEFAULT_MAX_NEW_TOKENS = 128


def slack_tokens(page_size: int) -> int:
    return max(2 * max(page_size, 1), 8)


def usable_tokens(capacity: int, page_size: int) -> int:
    """KV slots one request may need on an instance of ``capacity`` slots unclipped."""
    return max(capacity - slack_tokens(page_size), 0)


def request_need(prompt_tokens: int, max_new_tokens: int | None) -> int:
    """KV slots a request holds when it finishes: prompt + max_new_tokens."""
    new = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max(int(max_new_tokens), 0)
    return int(prompt_tokens) + new


@dataclass(frozen=True)
class RequestLimits:
    """The request sizes a host can serve: ``rank_capacity`` is one TP1 replica's KV slots;
    an aligned group of ``k <= max_tp`` replicas holds ``k`` times the usable slots of one.
    ``context_len`` (the model's) bounds every request as well (None: unknown)."""

    rank_capacity: int
    max_tp: int
    page_size: int = 1
    context_len: int | None = None

    @property
    def rank_usable(self) -> int:
        return usable_tokens(self.rank_capacity, self.page_size)

    def usable_at(self, degree: int) -> int:
        return degree * self.rank_usable

    @property
    def max_request_tokens(self) -> int:
        largest = self.usable_at(self.max_tp)
        return largest if self.context_len is None else min(largest, self.context_len)

    def rejection(self, prompt_tokens: int, max_new_tokens: int | None) -> str | None:
        """A user-facing message if the request can never be served here, else None."""
        need = request_need(prompt_tokens, max_new_tokens)
        if need <= self.max_request_tokens:
            return None
        new = need - prompt_tokens
        what = (f"{need} tokens of KV cache ({prompt_tokens} prompt + {new} new tokens"
                + (", the default when max_new_tokens is not set" if max_new_tokens is None
                   else "") + ")")
        largest = self.usable_at(self.max_tp)
        if need > largest:
            return (f"Request too large for this server: it needs {what}, but the largest "
                    f"instance this server can form (TP{self.max_tp}: {self.max_tp} x "
                    f"{self.rank_usable} usable KV slots) holds {largest}. Use a shorter "
                    "prompt or a smaller max_new_tokens.")
        return (f"Request too large for this server: it needs {what}, more than the "
                f"model's context length of {self.context_len} tokens.")
