"""Hooks on ``sglang.srt.server_args.ServerArgs``: the ``--gyges-*`` flags and GygesConfig.

``ServerArgs`` is a sealed msgspec struct, so the config rides on the underscore
attribute ``_gyges``, which survives pickling into every SGLang child process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from gyges.config import DEFAULT_GRANULE_BYTES, POLICIES, GygesConfig, GygesConfigError
from gyges.core.architectures import (
    UnsupportedArchitecture,
    check_architecture,
    check_shardable,
)
from gyges.core.serving_path import DEFAULT_BACKEND, ServingPath, refusal, resolve_device

TARGET = "sglang.srt.server_args.ServerArgs"
ATTR = "_gyges"


def add_cli_args(_result: None, parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Gyges (dynamic DP <-> TP transformation)")
    g.add_argument("--enable-gyges", action="store_true",
                   help="Boot --dp-size TP1 replicas that merge into TP groups at runtime.")
    g.add_argument("--gyges-max-tp", type=int, default=None,
                   help="Largest TP degree an instance may reach (power of two; default: "
                        "dp size, capped by the model's KV heads).")
    g.add_argument("--gyges-policy", choices=POLICIES, default="gyges",
                   help="Dispatch policy of the data-parallel controller.")
    g.add_argument("--gyges-granule-bytes", type=int, default=DEFAULT_GRANULE_BYTES,
                   help="Allocation granule of padded MLP weight shards (bytes).")
    g.add_argument("--gyges-split-hold-down", type=float, default=5.0,
                   help="Seconds a merged instance must hold no long request before it splits.")


def before_from_cli_args(_cls: type, args: argparse.Namespace) -> None:
    """Refuse a feature or an architecture Gyges cannot transform before SGLang builds
    anything, or validates flags of its own (exit 2, one line); a model path without a local
    config.json is refused by ``from_cli_args``."""
    if not getattr(args, "enable_gyges", False):
        return
    _check_features(args)
    path = os.path.join(args.model_path, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            check_architecture(json.load(f))
    except (UnsupportedArchitecture, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


TREE_CORE_ENV = "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"


def from_cli_args(result: Any, _cls: type, args: argparse.Namespace) -> None:
    """Validate the Gyges flags and attach the frozen config; exit 2 on bad input."""
    enabled = bool(getattr(args, "enable_gyges", False))
    try:
        config = GygesConfig.build(
            enabled=enabled,
            tp_size=int(args.tp_size),
            dp_size=int(args.dp_size),
            max_tp=args.gyges_max_tp,
            policy=args.gyges_policy,
            num_kv_heads=_num_kv_heads(args.model_path) if enabled else 0,
            granule_bytes=args.gyges_granule_bytes,
            split_hold_down_s=args.gyges_split_hold_down,
        )
        if enabled:
            check_shardable(_config_json(args.model_path), config.max_tp)
    except (GygesConfigError, UnsupportedArchitecture) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    setattr(result, ATTR, config)
    if enabled:
        _check_serving_path(result)
        # The prefix cache survives transformations by walking the radix tree's nodes
        # (switch/prefix_cache); SGLang's Rust tree core exposes none, its Python core
        # does. An explicit choice is kept (then only running requests' prefixes survive).
        os.environ.setdefault(TREE_CORE_ENV, "python")


BACKEND_FLAGS = {"--attention-backend": "attention_backend",
                 "--prefill-attention-backend": "prefill_attention_backend",
                 "--decode-attention-backend": "decode_attention_backend"}


def _check_serving_path(result: Any) -> None:
    """Exit 2 with one line on a device, attention backend or CUDA setting Gyges has not
    built or verified; an unset --attention-backend becomes the device's verified one."""
    import torch

    device = resolve_device(result.device, torch.cuda.is_available())
    path = ServingPath(device, {flag: getattr(result, name)
                                for flag, name in BACKEND_FLAGS.items()},
                       cuda_graph=not result.disable_cuda_graph)
    why = refusal(path)
    if why:
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(2)
    if result.attention_backend is None:
        result.attention_backend = DEFAULT_BACKEND[device]


# SGLang features a merge cannot keep in step or does not move: merged TP ranks must
# schedule the same batches from the same state (docs/merge-protocol.md, merge step 7); a
# merge reshards the base model's layers of one pipeline stage and moves KV laid out
# head-major, nothing else. (attribute, refused when, one line)
REFUSED_FEATURES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("pp_size", lambda v: int(v or 1) > 1,
     "--enable-gyges requires --pp-size 1: a merge moves the KV and weights of one "
     "pipeline stage's layers, pipeline stages are not built"),
    ("enable_prefill_delayer", bool,
     "--enable-prefill-delayer cannot be combined with --enable-gyges: the delayer "
     "negotiates over the TP group it found at startup and times its delays by each "
     "rank's clock, so the ranks of a merged group would admit prefills apart"),
    ("speculative_algorithm", lambda v: v not in (None, "", "NONE"),
     "--speculative-algorithm cannot be combined with --enable-gyges: a merge reshards "
     "the target model only, not a draft model or the speculative state"),
    ("enable_lora", bool,
     "--enable-lora cannot be combined with --enable-gyges: LoRA adapters are sliced for "
     "TP1 when loaded and a merge does not reshard them"),
    ("lora_paths", bool,
     "--lora-paths cannot be combined with --enable-gyges: LoRA adapters are sliced for "
     "TP1 when loaded and a merge does not reshard them"),
    ("enable_hierarchical_cache", bool,
     "--enable-hierarchical-cache cannot be combined with --enable-gyges: HiCache's host "
     "KV pool assumes token-major rows, the Gyges KV pool is head-major"),
    ("enable_lmcache", bool,
     "--enable-lmcache cannot be combined with --enable-gyges: LMCache reads the KV pool "
     "as token-major rows, the Gyges KV pool is head-major"),
    ("enable_flexkv", bool,
     "--enable-flexkv cannot be combined with --enable-gyges: FlexKV reads the KV pool as "
     "token-major rows, the Gyges KV pool is head-major"),
    ("disaggregation_mode", lambda v: v not in (None, "", "null"),
     "--disaggregation-mode cannot be combined with --enable-gyges: prefill/decode "
     "disaggregation sends the KV pool's rows token-major, the Gyges KV pool is head-major"),
    ("enable_memory_saver", bool,
     "--enable-memory-saver cannot be combined with --enable-gyges: releasing and resuming "
     "memory is not built for the padded MLP shards and the head-major KV pool"),
)


def _check_features(result: Any) -> None:
    """Exit 2 with one line on a feature Gyges cannot keep in step across a merge."""
    for name, refused, why in REFUSED_FEATURES:
        if refused(getattr(result, name, None)):
            print(f"error: {why}", file=sys.stderr)
            raise SystemExit(2)


def gyges_config(server_args: Any) -> GygesConfig | None:
    """The server's GygesConfig if ``--enable-gyges`` was given, else None."""
    config = getattr(server_args, ATTR, None)
    return config if config is not None and config.enabled else None


def _config_json(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise GygesConfigError(
            f"--enable-gyges needs a local model directory with config.json (got {model_path!r})"
        )
    with open(path) as f:
        return json.load(f)


def _num_kv_heads(model_path: str) -> int:
    path = os.path.join(model_path, "config.json")
    cfg = _config_json(model_path)
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    if not heads:
        raise GygesConfigError(f"cannot read the number of KV heads from {path}")
    return int(heads)
