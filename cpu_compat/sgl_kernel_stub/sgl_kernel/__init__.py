"""Import-only stand-in for ``sgl_kernel`` on machines without CUDA.

No CPU build of sgl_kernel is published. SGLang imports it at module level but, on the
CPU device with the torch_native attention backend, takes its native fallbacks. Any
attribute resolves to a function that raises ``NotImplementedError`` so that a real call
fails loudly instead of silently computing something wrong.
"""
from __future__ import annotations

import sys
import types
from typing import Any, NoReturn

__version__ = "0.0.0+cpu-stub"


def _missing(name: str):
    def _raise(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"sgl_kernel.{name} is not available on this CPU-only install")

    _raise.__name__ = name
    return _raise


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{self.__name__.split('.', 1)[-1]}.{name}")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


class _StubFinder:
    """Resolve ``import sgl_kernel.<anything>`` to a stub submodule."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if not fullname.startswith("sgl_kernel."):
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module) -> None:
        return None


sys.meta_path.append(_StubFinder())
