"""Gyges demo: a 2-replica SGLang server on CPU with --enable-gyges, driven by real clients.

    bash scripts/demo.sh            # or: .venv/bin/python examples/demo.py

Builds (or reuses) a tiny local Llama, starts
``python -m sglang.launch_server ... --dp-size 2 --enable-gyges`` on CPU, sends requests
through the OpenAI client and SGLang's native ``/generate``, prints the answers and
``/gyges/status``, and stops the server (all its processes) on the way out.
"""
from __future__ import annotations

import argparse
import json

import openai
import requests

from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp-size", type=int, default=2)
    a = p.parse_args()

    model = tiny_model(LLAMA_GQA)
    print(f"tiny model: {model}")
    print(f"starting: python -m sglang.launch_server --model-path {model} --device cpu "
          f"--dp-size {a.dp_size} --enable-gyges ...  (30-60 s on a 2-core CPU)")
    with SGLangServer(model, dp_size=a.dp_size, gyges=True) as srv:
        print(f"server up at {srv.url}  (log: {srv.log_path})\n")
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        name = client.models.list().data[0].id
        for question in ("Why merge replicas?", "What is a KV cache?"):
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": question}],
                max_tokens=16, temperature=0)
            print(f"[openai chat] {question!r} -> {reply.choices[0].message.content!r}")
        r = requests.post(srv.url + "/generate", timeout=120, json={
            "text": "the model serves a long request",
            "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
        r.raise_for_status()
        out = r.json()
        print(f"[/generate] {out['text']!r} ({out['meta_info']['completion_tokens']} tokens)")
        status = requests.get(srv.url + "/gyges/status", timeout=10).json()
        print("\n/gyges/status:\n" + json.dumps(status, indent=2))
    print("\nserver stopped.")
    print("(The weights are random: the answers are gibberish by design.)")


if __name__ == "__main__":
    main()
