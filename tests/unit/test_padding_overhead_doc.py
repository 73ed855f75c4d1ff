from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_padding_overhead_doc_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("padding_overhead", ROOT / "benchmark" /
                                                  "padding_overhead.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = (ROOT / "docs" / "padding-overhead.md").read_text()
    assert doc == script.render(), (
        "run: PYTHONPATH=python python benchmark/padding_overhead.py --write"
    )
