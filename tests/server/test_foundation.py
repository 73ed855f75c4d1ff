"""Foundation: the plugin in a real SGLang server on CPU, compared with stock SGLang."""
from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
import requests

from gyges.testing.clients import generate_ids, greedy_outputs
from gyges.testing.server import SGLangServer, cpu_env, parse_server_args, tiny_model
from gyges.testing.tiers import ci_subset
from gyges.testing.tiny_model import LLAMA_GQA

ARCHES = {
    "llama": LLAMA_GQA.__dict__,
    "qwen2": dict(arch="qwen2", heads=8, kv_heads=4, head_dim=16),
    "qwen3": dict(arch="qwen3", heads=4, kv_heads=4),
}


# CI: llama (its Gyges server is shared); qwen2 and qwen3 start two servers each (slow
# tier; they merge live in test_arch_merge / test_layout_equivalence)
@pytest.mark.parametrize("arch", ci_subset(["qwen2", "qwen3", "llama"], ["llama"]))
def test_gyges_matches_stock_dp2(arch, request):
    model = tiny_model(**ARCHES[arch])
    with SGLangServer(model, dp_size=2, gyges=False) as stock:
        expected = greedy_outputs(stock.url)
        assert requests.get(stock.url + "/gyges/status", timeout=10).status_code == 404
    if arch == "llama":
        got = greedy_outputs(request.getfixturevalue("llama_gyges").url)
    else:
        with SGLangServer(model, dp_size=2, gyges=True) as gy:
            got = greedy_outputs(gy.url)
    assert got == expected
    assert all(len(x) == 16 for x in got["ids"])


def test_status_at_boot_and_plugin_in_every_process(llama_gyges):
    st = requests.get(llama_gyges.url + "/gyges/status", timeout=10).json()
    assert st["dp_size"] == 2 and st["max_tp"] == 2 and st["policy"] == "gyges"
    assert [(i["ranks"], i["tp"], i["leader"]) for i in st["instances"]] == [([0], 1, 0),
                                                                            ([1], 1, 1)]
    for inst in st["instances"]:
        assert inst["capacity_tokens"] > 0
        assert {"used_tokens", "running", "waiting"} <= inst.keys()
    procs = st["processes"]
    # Each pid is a live process of this server, and each runs the Gyges hooks: the
    # schedulers registered from their own process, the controller answered the status.
    server_tree = {p.pid for p in psutil.Process(llama_gyges.proc.pid).children(recursive=True)}
    server_tree.add(llama_gyges.proc.pid)
    pids = [procs["http_server"]["pid"], procs["dp_controller"]["pid"],
            *[s["pid"] for s in procs["schedulers"]]]
    assert len(set(pids)) == 4 and set(pids) <= server_tree
    assert [s["rank"] for s in procs["schedulers"]] == [0, 1]
    titles = {psutil.Process(p).cmdline()[0] for p in pids[1:]}
    assert any("data_parallel_controller" in t for t in titles)
    assert sum("scheduler" in t for t in titles) >= 1


def test_sglang_frontend_program(llama_gyges):
    import sglang as sgl

    @sgl.function
    def two_turns(s, question):
        s += "Q: " + question + "\n"
        s += "A: " + sgl.gen("answer", max_tokens=8, temperature=0)
        s += "\nQ: and then?\nA: " + sgl.gen("more", max_tokens=6, temperature=0)

    backend = sgl.RuntimeEndpoint(llama_gyges.url)
    state = two_turns.run(question="the model serves a long request", backend=backend)
    assert state["answer"] and state["more"]
    batch = two_turns.run_batch([{"question": "one two"}, {"question": "three four"}],
                                backend=backend)
    assert all(s["answer"] for s in batch)


def test_openai_client(llama_gyges):
    import openai

    client = openai.OpenAI(base_url=llama_gyges.url + "/v1", api_key="none")
    models = client.models.list()
    assert models.data
    chat = client.chat.completions.create(
        model=models.data[0].id, messages=[{"role": "user", "content": "hello"}],
        max_tokens=8, temperature=0)
    assert chat.choices[0].message.content
    stream = client.completions.create(model=models.data[0].id, prompt="the model",
                                       max_tokens=8, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    full = client.completions.create(model=models.data[0].id, prompt="the model",
                                     max_tokens=8, temperature=0)
    assert "".join(pieces) == full.choices[0].text


INVALID = [
    (["--dp-size", "2", "--tp-size", "2"], "requires --tp-size 1"),
    (["--dp-size", "4", "--gyges-max-tp", "3"], "must be a power of two"),
    (["--dp-size", "2", "--gyges-max-tp", "4"], "larger than --dp-size 2"),
    (["--dp-size", "8", "--gyges-max-tp", "4"], "larger than the model's 2 KV heads"),
    (["--dp-size", "6", "--gyges-max-tp", "4"], "--dp-size 6 must be a multiple"),
    (["--dp-size", "2", "--pp-size", "2"], "--enable-gyges requires --pp-size 1"),
    (["--dp-size", "2", "--enable-prefill-delayer"],
     "--enable-prefill-delayer cannot be combined with --enable-gyges"),
    (["--dp-size", "2", "--speculative-algorithm", "NGRAM"],
     "--speculative-algorithm cannot be combined with --enable-gyges"),
    (["--dp-size", "2", "--enable-lora", "--max-lora-rank", "8"],
     "--enable-lora cannot be combined with --enable-gyges"),
    (["--dp-size", "2", "--enable-hierarchical-cache"],
     "--enable-hierarchical-cache cannot be combined with --enable-gyges"),
    (["--dp-size", "2", "--enable-lmcache"], "--enable-lmcache cannot be combined"),
    (["--dp-size", "2", "--disaggregation-mode", "prefill"],
     "--disaggregation-mode cannot be combined with --enable-gyges"),
    (["--dp-size", "2", "--enable-memory-saver"],
     "--enable-memory-saver cannot be combined with --enable-gyges"),
]

def _model_for(message: str) -> str:
    # The "larger than KV heads" case needs a model with 2 KV heads; the others use 8.
    return str(tiny_model(arch="llama", heads=8, kv_heads=2 if "KV heads" in message else 8))


def test_invalid_flag_combinations_are_refused():
    cases = [["--model-path", _model_for(m), "--device", "cpu", "--enable-gyges", *flags]
             for flags, m in INVALID]
    results = [(r["code"], r["stderr"]) for r in parse_server_args(cases)]
    for (flags, message), (code, err) in zip(INVALID, results, strict=True):
        assert code == 2, (flags, err)
        assert message in err, (flags, err)


def test_launch_server_exits_with_message():
    flags, message = INVALID[0]
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", _model_for(message),
           "--device", "cpu", "--enable-gyges", *flags]
    proc = subprocess.run(cmd, env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_sglang_bench_serving_client(llama_gyges, tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--base-url", llama_gyges.url, "--dataset-name", "random-ids",
           "--tokenizer", llama_gyges.model, "--num-prompts", "8",
           "--random-input-len", "32", "--random-output-len", "8", "--random-range-ratio", "1",
           "--disable-tqdm", "--warmup-requests", "1", "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text().strip().splitlines()[-1])
    assert result["completed"] == 8
    assert result["total_output_tokens"] == 8 * 8


REFUSED = [("qwen2_moe", "Qwen2MoeForCausalLM", "shared expert"),
           ("deepseek_v3", "DeepseekV3ForCausalLM", "MLA attention"),
           ("gemma3", "Gemma3ForConditionalGeneration", "vision tower"),
           ("llama4", "Llama4ForConditionalGeneration", "layers without a dense MLP")]


def _config_dir(tmp_path, model_type: str, arch: str) -> str:
    """A model directory holding only the config.json transformers writes for model_type:
    the check must refuse it before anything else is read."""
    from transformers import AutoConfig

    path = tmp_path / model_type
    AutoConfig.for_model(model_type, architectures=[arch]).save_pretrained(path)
    return str(path)


def test_unsupported_architectures_are_refused_before_loading(tmp_path):
    cases = [["--model-path", _config_dir(tmp_path, t, a), "--device", "cpu",
              "--enable-gyges", "--dp-size", "2"] for t, a, _ in REFUSED]
    results = [(r["code"], r["stderr"]) for r in parse_server_args(cases)]
    for (model_type, _, why), (code, err) in zip(REFUSED, results, strict=True):
        assert code == 2, (model_type, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and why in lines[0] and "drop --enable-gyges" in lines[0], err
    # through launch_server too: exit 2, one line, no traceback
    cmd = [sys.executable, "-m", "sglang.launch_server", *cases[0]]
    proc = subprocess.run(cmd, env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert REFUSED[0][2] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_weight_update_routes_are_refused_and_the_server_keeps_serving(llama_gyges):
    """SGLang's weight loaders do not fit the padded MLP shards: an /update_weights_from_disk
    ended the scheduler (IndexError) before these routes were refused."""
    from gyges.hooks.http_server import RefusedRoutes

    url = llama_gyges.url
    before = generate_ids(url, [5, 9, 13, 17])
    for path in sorted(RefusedRoutes.PATHS):
        r = requests.post(url + path, json={"model_path": llama_gyges.model,
                                            "name": "model.layers.0.mlp.down_proj.weight"},
                          timeout=30)
        assert r.status_code == 400, (path, r.text)
        body = r.json()
        assert body["success"] is False and path in body["message"], body
        assert "--enable-gyges" in body["message"], body
    assert generate_ids(url, [5, 9, 13, 17]) == before
    assert requests.get(url + "/health", timeout=30).status_code == 200
