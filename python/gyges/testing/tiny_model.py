"""Write a tiny random HF-format checkpoint that SGLang and transformers both load.

    python -m gyges.testing.tiny_model --out DIR --arch {llama,qwen2,...} [--hidden N ...]

The tokenizer is a byte-level BPE trained locally on a small generated corpus, with a
ChatML-style chat template; nothing is fetched from a hub. Weights are random with a
fixed seed; the init scale is larger than HF's default so greedy decoding has clear
argmax margins (float32 equality tests then compare real computations, not ties).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

ARCHES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "granite", "olmo2", "glm4", "gemma",
          "gemma2", "gemma3", "internlm2", "mixtral", "qwen3_moe")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the", "a", "an", "of", "to", "in", "and", "is", "it", "that", "for", "on", "with",
    "as", "was", "by", "at", "from", "be", "this", "have", "or", "are", "model", "token",
    "cache", "layer", "head", "merge", "split", "group", "rank", "serve", "request", "long",
    "short", "prompt", "replica", "tensor", "parallel", "data", "memory", "page", "block",
    "slot", "weight", "shard", "query", "key", "value", "fast", "slow", "river", "mountain",
    "city", "ocean", "forest", "paper", "engine", "cloud", "light", "sound", "time", "day",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "hundred", "thousand", "what", "why", "how", "who",
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny checkpoint; defaults give a ~1M-parameter model."""

    arch: str = "llama"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 256
    vocab: int = 1024
    max_position: int = 32768
    dtype: str = "float32"
    seed: int = 0
    init_std: float = 0.08

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"--arch must be one of {ARCHES}, got {self.arch!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("--dtype must be float32 or bfloat16")
        if self.vocab < 300:
            raise ValueError("--vocab must be at least 300 (256 bytes + merges + specials)")


# The model most server tests and the demo share: GQA with 2 KV heads (max TP 2).
LLAMA_GQA = TinyModelSpec(arch="llama", heads=4, kv_heads=2)


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) for _ in range(lines)]


def build_tokenizer(vocab: int, seed: int):
    """Train a byte-level BPE locally and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(spec: TinyModelSpec, tokenizer):
    import transformers

    common = dict(
        vocab_size=max(spec.vocab, len(tokenizer)),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position,
        initializer_range=spec.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "phi3": transformers.Phi3Config,
        "granite": transformers.GraniteConfig,
        "olmo2": transformers.Olmo2Config,
        "glm4": transformers.Glm4Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
        "mixtral": transformers.MixtralConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }[spec.arch]
    cfg = cls(**{**common, **_EXTRA.get(spec.arch, {})})
    if spec.arch == "qwen3_moe":
        cfg.moe_intermediate_size = spec.intermediate
    if spec.arch.startswith("gemma"):
        # transformers 5 names Gemma's activation hidden_activation; SGLang reads hidden_act
        cfg.hidden_act = cfg.hidden_activation = "gelu_pytorch_tanh"
    cfg.torch_dtype = spec.dtype
    return cfg


# Per-architecture config fields beyond the common ones: no sliding windows (Mistral, Phi-3);
# Granite's muP multipliers away from 1 so each one is exercised.
_EXTRA: dict[str, dict[str, object]] = {
    "mistral": {"sliding_window": None},
    "phi3": {"sliding_window": None},
    "granite": {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.05, "logits_scaling": 2.0},
    # Gemma: tied embeddings as SGLang always ties them; sliding windows short enough that
    # the tests' requests outgrow them; soft-capping low enough to bite
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {"tie_word_embeddings": True, "query_pre_attn_scalar": 32, "sliding_window": 48,
               "attn_logit_softcapping": 10.0, "final_logit_softcapping": 10.0},
    "gemma3": {"tie_word_embeddings": True, "query_pre_attn_scalar": 32, "sliding_window": 48,
               "layer_types": ["sliding_attention", "full_attention"]},
    # MoE: 4 experts, 2 routed per token, every layer sparse; each expert's intermediate is
    # the spec's (Qwen3-MoE names it moe_intermediate_size)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
}


def write_tiny_model(out: str | Path, spec: TinyModelSpec) -> Path:
    """Write config, safetensors weights, tokenizer and generation config to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab, spec.seed)
    if spec.arch == "internlm2":  # no transformers classes: written by hand
        from gyges.testing.tiny_internlm2 import write_internlm2

        cfg = write_internlm2(out, spec, tokenizer)
        _finish(out, spec, tokenizer, cfg["bos_token_id"], cfg["eos_token_id"],
                cfg["pad_token_id"])
        return out
    config = build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # HF zero-inits biases; give Qwen2's qkv bias real values
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, spec.init_std)
            elif spec.arch == "olmo2" and name.endswith(("q_norm.weight", "k_norm.weight")):
                # OLMo2's QK-norm spans all heads: distinct weights per head make a head
                # order mistake in a resharded norm visible
                p.normal_(1.0, 0.2)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)
    _finish(out, spec, tokenizer, config.bos_token_id, config.eos_token_id,
            config.pad_token_id)
    return out


def _finish(out: Path, spec: TinyModelSpec, tokenizer, bos: int, eos: int, pad: int) -> None:
    """Tokenizer, generation config and the spec marker (written last: the cache's key)."""
    from transformers import GenerationConfig

    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    (out / "gyges_tiny_model.json").write_text(json.dumps(spec.__dict__, indent=2))


def _parse(argv: list[str] | None) -> tuple[Path, TinyModelSpec]:
    d = TinyModelSpec()
    p = argparse.ArgumentParser(prog="python -m gyges.testing.tiny_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--arch", choices=ARCHES, default=d.arch)
    for flag, default in (("hidden", d.hidden), ("layers", d.layers), ("heads", d.heads),
                          ("kv-heads", d.kv_heads), ("head-dim", d.head_dim),
                          ("intermediate", d.intermediate), ("vocab", d.vocab),
                          ("max-position", d.max_position), ("seed", d.seed)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype)
    p.add_argument("--init-std", type=float, default=d.init_std)
    a = p.parse_args(argv)
    try:
        spec = TinyModelSpec(arch=a.arch, hidden=a.hidden, layers=a.layers, heads=a.heads,
                             kv_heads=a.kv_heads, head_dim=a.head_dim,
                             intermediate=a.intermediate, vocab=a.vocab,
                             max_position=a.max_position, dtype=a.dtype, seed=a.seed,
                             init_std=a.init_std)
    except ValueError as e:
        p.error(str(e))
    return a.out, spec


def main(argv: list[str] | None = None) -> None:
    out, spec = _parse(argv)
    write_tiny_model(out, spec)
    print(f"wrote {spec.arch} tiny model to {out}")


if __name__ == "__main__":
    main()
