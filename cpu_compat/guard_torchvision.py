"""Guard torchvision's fake-op registrations so a CUDA torchvision imports on CPU torch.

The registry's torchvision wheel is a CUDA build. Its ``_meta_registrations.py`` registers
fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally; without
the compiled extension those operators do not exist and ``import torchvision`` raises
(transformers and SGLang import it). We route those decorators through a guard that is a
no-op when ``torchvision.extension._has_ops()`` is false. Idempotent.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

MARK = "# gyges-cpu-guard-v2"
TARGET = '@torch.library.register_fake("torchvision::'
HELPER = f'''
{MARK}
def _gyges_guarded_fake(op_name):
    import torchvision.extension as _ext
    if not _ext._has_ops():
        return lambda fn: fn
    return torch.library.register_fake(op_name)

'''


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("guard_torchvision: torchvision not installed, nothing to do")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    src = path.read_text()
    if MARK in src:
        return 0
    if TARGET not in src:
        return 0  # a torchvision without unconditional registrations: nothing to guard
    anchor = "\ndef register_meta("
    if anchor not in src:
        print(f"guard_torchvision: unexpected layout of {path}", file=sys.stderr)
        return 1
    src = src.replace(TARGET, '@_gyges_guarded_fake("torchvision::')
    src = src.replace(anchor, HELPER + anchor, 1)
    path.write_text(src)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
