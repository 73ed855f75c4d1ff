"""Token-need estimates of request bodies (prompt + max new tokens)."""

from __future__ import annotations

from gyges.router.need import NeedEstimator

EST = NeedEstimator(chars_per_token=4.0)


def test_generate_text_ids_and_batches():
    assert EST.estimate("/generate", {"text": "x" * 40}) == 10 + 128
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 7}}
    assert EST.estimate("/generate", body) == 10
    batch = {"text": ["ab", "x" * 400], "sampling_params": [{"max_new_tokens": 5}, {}]}
    assert EST.estimate("/generate", batch) == 100 + 128
    assert EST.estimate("/generate", {"input_ids": [[1] * 9, [2] * 3]}) == 9 + 128
    junk = {"text": 5, "sampling_params": {"max_new_tokens": "many"}}
    assert EST.estimate("/generate", junk) == 128


def test_openai_completions_and_chat():
    assert EST.estimate("/v1/completions", {"prompt": "y" * 8}) == 2 + 16
    assert EST.estimate("/v1/completions", {"prompt": [5] * 30, "max_tokens": 10}) == 40
    chat = {
        "messages": [
            {"role": "system", "content": "s" * 8},
            {"role": "user", "content": [{"type": "text", "text": "u" * 16}, {"type": "image"}]},
        ],
        "max_tokens": 50,
        "max_completion_tokens": 20,
    }
    assert EST.estimate("/v1/chat/completions", chat) == (4 + 2) + (4 + 4) + 20
    assert EST.estimate("/v1/chat/completions", {"messages": "bad"}) == 128


def test_chars_per_token_is_configurable():
    assert NeedEstimator(2.0).estimate("/generate", {"text": "z" * 10}) == 5 + 128
