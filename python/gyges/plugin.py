"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``gyges``).

SGLang calls :func:`load` in every process (launcher/HTTP server, DP controller,
schedulers, detokenizer). It only registers hooks; each hook is inert unless the server
runs with ``--enable-gyges``.
"""
from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from gyges.hooks import (
    data_parallel_controller,
    fused_moe,
    http_server,
    kv_cache_configurator,
    model_runner,
    models,
    schedule_policy,
    scheduler,
    server_args,
    tokenizer_manager,
    torch_native_backend,
)


def load() -> None:
    reg = HookRegistry.register
    reg(f"{server_args.TARGET}.add_cli_args", server_args.add_cli_args, HookType.AFTER)
    reg(f"{server_args.TARGET}.from_cli_args", server_args.before_from_cli_args,
        HookType.BEFORE)
    reg(f"{server_args.TARGET}.from_cli_args", server_args.from_cli_args, HookType.AFTER)
    reg(http_server.TARGET, http_server.before_setup_and_run_http_server, HookType.BEFORE)
    reg(f"{data_parallel_controller.TARGET}.init_dispatcher",
        data_parallel_controller.after_init_dispatcher, HookType.AFTER)
    reg(f"{scheduler.TARGET}.init_ipc_channels", scheduler.after_init_ipc_channels,
        HookType.AFTER)
    reg(f"{scheduler.TARGET}.run_event_loop", scheduler.before_run_event_loop,
        HookType.BEFORE)
    reg(f"{scheduler.TARGET}.ingest_requests", scheduler.after_ingest_requests, HookType.AFTER)
    reg(f"{scheduler.TARGET}.send_control_output", scheduler.after_send_control_output,
        HookType.AFTER)
    reg(f"{scheduler.TARGET}.get_new_batch_prefill", scheduler.before_get_new_batch_prefill,
        HookType.BEFORE)
    reg(f"{schedule_policy.TARGET}.calc_priority", schedule_policy.after_calc_priority,
        HookType.AFTER)
    reg(f"{scheduler.TARGET}.is_disable_overlap_for_batch",
        scheduler.after_is_disable_overlap_for_batch, HookType.AFTER)
    for name, hook in data_parallel_controller.AROUND_HOOKS.items():
        reg(f"{data_parallel_controller.TARGET}.{name}", hook, HookType.AROUND)
    reg(f"{tokenizer_manager.TARGET}._validate_one_request",
        tokenizer_manager.after_validate_one_request, HookType.AFTER)
    reg(f"{kv_cache_configurator.TARGET}._resolve_kv_pool_class",
        kv_cache_configurator.around_resolve_kv_pool_class, HookType.AROUND)
    reg(f"{kv_cache_configurator.TARGET}._apply_token_constraints",
        kv_cache_configurator.around_apply_token_constraints, HookType.AROUND)
    reg(f"{model_runner.TARGET}.maybe_apply_post_load_model_transforms",
        model_runner.after_post_load_model_transforms, HookType.AFTER)
    for mlp in models.MLP_TARGETS:
        reg(f"{mlp}.forward", models.around_mlp_forward, HookType.AROUND)
    reg(models.OLMO2_QK_NORM, models.around_olmo2_qk_norm, HookType.AROUND)
    reg(f"{fused_moe.TARGET}.forward", fused_moe.around_forward, HookType.AROUND)
    for method in torch_native_backend.METHODS:
        reg(f"{torch_native_backend.TARGET}.{method}", torch_native_backend.around_run_sdpa,
            HookType.AROUND)
