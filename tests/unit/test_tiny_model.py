from __future__ import annotations

import json

import pytest
import torch

from gyges.testing.tiny_model import TinyModelSpec, main, write_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_loads_in_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = TinyModelSpec(arch=arch, hidden=64, heads=4, kv_heads=2, head_dim=16,
                         intermediate=128, vocab=400)
    write_tiny_model(tmp_path, spec)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tok("the model serves a long request", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "the model serves a long request"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == cfg["vocab_size"] and torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    spec = TinyModelSpec(hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=300)
    a, b = write_tiny_model(tmp_path / "a", spec), write_tiny_model(tmp_path / "b", spec)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_rejects_bad_shapes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--heads", "6", "--kv-heads", "4"])
    assert e.value.code == 2
    assert "multiple of --kv-heads" in capsys.readouterr().err
