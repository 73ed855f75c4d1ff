"""A tiny random InternLM2 checkpoint (``InternLM2ForCausalLM``, remote-code config).

transformers has no InternLM2 classes, so the checkpoint is written by hand: a
``config.json`` whose ``auto_map`` points at a minimal ``configuration_internlm2.py`` (serve
it with ``--trust-remote-code``) and safetensors under InternLM2's own names, with its fused
``wqkv`` in InternLM2's grouped layout (per KV head: its query heads, then k, then v). The
tokenizer is the same local BPE as the other tiny models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_SOURCE = '''from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=1024, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
                 rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, bias=False,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.bias = bias
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''


def write_internlm2(out: Path, spec: Any, tokenizer: Any) -> dict[str, Any]:
    """Write config, remote-code config class and weights for ``spec`` (a TinyModelSpec with
    ``head_dim == hidden / heads``, as InternLM2 derives it); returns the config dict."""
    import json

    import torch
    from safetensors.torch import save_file

    if spec.head_dim * spec.heads != spec.hidden:
        raise ValueError("InternLM2 derives head_dim = hidden / heads")
    vocab = max(spec.vocab, len(tokenizer))
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        "vocab_size": vocab, "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": spec.max_position,
        "initializer_range": spec.init_std, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "bias": False, "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "torch_dtype": spec.dtype,
    }
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * spec.init_std).to(dtype)

    hd, inter, qkv_rows = spec.hidden, spec.intermediate, (spec.heads + 2 * spec.kv_heads)
    tensors = {"model.tok_embeddings.weight": rand(vocab, hd),
               "model.norm.weight": torch.ones(hd, dtype=dtype),
               "output.weight": rand(vocab, hd)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "attention.wqkv.weight": rand(qkv_rows * spec.head_dim, hd),
            p + "attention.wo.weight": rand(hd, spec.heads * spec.head_dim),
            p + "feed_forward.w1.weight": rand(inter, hd),
            p + "feed_forward.w3.weight": rand(inter, hd),
            p + "feed_forward.w2.weight": rand(hd, inter),
            p + "attention_norm.weight": torch.ones(hd, dtype=dtype),
            p + "ffn_norm.weight": torch.ones(hd, dtype=dtype),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "configuration_internlm2.py").write_text(CONFIG_SOURCE)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config
