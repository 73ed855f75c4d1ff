"""Thin SGLang hooks, one module per patched SGLang component.

Every hook is registered through SGLang's ``HookRegistry`` by :func:`gyges.plugin.load`
and is a no-op unless the server was started with ``--enable-gyges``.
"""
