"""Model shapes for the cost model: built-in dense models and Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class SimInputError(ValueError):
    """Bad user input (unknown name, unreadable file); the CLI prints it as one line."""


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer (Llama/Qwen2 family), bf16 weights and KV."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2

    @property
    def attn_params_per_layer(self) -> int:
        """q, k, v and o projections."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * q + kv

    @property
    def mlp_params_per_layer(self) -> int:
        """gate, up and down (SiLU-gated MLP)."""
        return 3 * self.hidden * self.intermediate

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        per_layer = self.attn_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden
        return self.layers * per_layer + self.embed_params

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def mlp_bytes(self) -> int:
        return self.layers * self.mlp_params_per_layer * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token at TP1."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


BUILTIN: dict[str, ModelSpec] = {
    # Values from each model's published config.json.
    "llama-3-8b": ModelSpec("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    "qwen2.5-32b": ModelSpec("qwen2.5-32b", 64, 5120, 40, 8, 128, 27648, 152064),
    "llama-3-70b": ModelSpec("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256),
}


def builtin_model(name: str) -> ModelSpec:
    try:
        return BUILTIN[name]
    except KeyError:
        raise SimInputError(f"unknown model {name!r}; choose one of {sorted(BUILTIN)} "
                            "or pass --model-path DIR") from None


def model_from_hf(path: str | Path) -> ModelSpec:
    """Read a Hugging Face model directory's (or file's) ``config.json``."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(cfg_path.read_text())
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelSpec(
            name=str(cfg.get("_name_or_path") or p.name),
            layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except OSError as e:
        raise SimInputError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SimInputError(f"{cfg_path} is not a usable Hugging Face config: {e!r}") from None
