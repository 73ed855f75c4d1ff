"""Hook on ``sglang.srt.model_executor.model_runner.ModelRunner``.

Under ``--enable-gyges``, right after SGLang's post-load model transforms (the seat of
gpt-fast style ``apply_torch_tp``; after the weights are loaded, before the KV cache is
sized), every dense MLP moves into padded shards (:func:`gyges.hooks.models.convert_mlps`),
and every mixture of experts into per-expert padded shards
(:func:`gyges.hooks.fused_moe.convert_experts`).
"""
from __future__ import annotations

import logging
from typing import Any

from gyges.hooks import fused_moe, models
from gyges.hooks.server_args import gyges_config

TARGET = "sglang.srt.model_executor.model_runner.ModelRunner"
logger = logging.getLogger(__name__)


def after_post_load_model_transforms(_result: None, runner: Any) -> None:
    config = gyges_config(runner.server_args)
    if config is None:
        return
    model = runner.model
    converted = models.convert_mlps(model, config.max_tp, config.granule_bytes)
    converted += fused_moe.convert_experts(model, config.max_tp, config.granule_bytes)
    if converted == 0:
        raise NotImplementedError(
            f"gyges: {type(model).__name__} has no dense MLP Gyges can shard; "
            "--enable-gyges supports the architectures in gyges.core.architectures"
        )
    model.gyges_mlp_storage = "padded"
    logger.info("Gyges: %d MLPs or expert sets in padded shards (max TP %d, granule %d bytes)",
                converted, config.max_tp, config.granule_bytes)
