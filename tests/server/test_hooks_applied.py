"""Every Gyges hook really patches its SGLang target (in process, no server).

SGLang's HookRegistry logs and skips a target it cannot patch, so a renamed SGLang
method would leave a hook silently inert; this catches it. Server tier: imports SGLang.
"""
from __future__ import annotations

import os
import pkgutil

import pytest

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
# the test-only plugin (gyges.testing.cpu_deterministic) registers its hook too: checked alike
os.environ.setdefault("GYGES_TEST_CPU_DETERMINISTIC", "1")


def test_every_registered_target_is_wrapped() -> None:
    hook_registry = pytest.importorskip("sglang.srt.plugins.hook_registry")
    from sglang.srt.plugins import load_plugins

    from gyges import plugin

    load_plugins()  # idempotent; applies the hooks of every installed plugin
    targets = [t for t, hooks in hook_registry.HookRegistry._hooks.items()
               if any(h is not None and getattr(h, "__module__", "").startswith("gyges.")
                      for _, h, _ in hooks)]
    assert len(targets) >= 12, targets
    for target in targets:
        assert target in hook_registry.HookRegistry._patched, f"not applied: {target}"
        owner, name = target.rsplit(".", 1)
        assert hasattr(getattr(pkgutil.resolve_name(owner), name), "__wrapped__"), target
    assert plugin.load.__module__ == "gyges.plugin"
