"""Guard torchvision's fake-op registrations so a CUDA torchvision imports on CPU torch.

The registry's torchvision wheel registers meta kernels for ``torchvision::nms`` and
``torchvision::roi_align``-style ops at import; without its compiled extension those
registrations raise. We wrap the registration decorator so it is a no-op when
``torchvision.extension._has_ops()`` is false. Idempotent.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

MARK = "# gyges-cpu-guard"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("guard_torchvision: torchvision not installed, nothing to do")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    src = path.read_text()
    if MARK in src:
        return 0
    old = "def register_meta(op_name, overload_name=\"default\"):\n    def wrapper(fn):\n"
    if old not in src:
        print(f"guard_torchvision: unexpected layout of {path}", file=sys.stderr)
        return 1
    new = old + (
        f"        {MARK}\n"
        "        import torchvision.extension as _ext\n"
        "        if not _ext._has_ops():\n"
        "            return fn\n"
    )
    path.write_text(src.replace(old, new, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
