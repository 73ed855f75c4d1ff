"""Import-only stand-in for ``sgl_kernel`` on machines without CUDA.

No CPU build of sgl_kernel is published. SGLang imports names from it at module level
but, on the CPU device with the torch_native attention backend, takes its native
fallbacks. Any top-level attribute resolves to a function that raises
``NotImplementedError``, so a real call fails loudly instead of computing something
wrong. Submodules (``sgl_kernel.scalar_type`` ...) deliberately do not exist: SGLang
guards those imports with ``except ImportError`` and then uses its own fallbacks.
"""
from __future__ import annotations

from typing import Any, NoReturn

__version__ = "0.0.0+cpu-stub"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"sgl_kernel.{name} is not available on this CPU-only install")

    _missing.__name__ = name
    return _missing
