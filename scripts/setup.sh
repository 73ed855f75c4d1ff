#!/usr/bin/env bash
# Create or update .venv/ at the repo root. Idempotent: a second run with nothing changed
# returns in about a second. On a machine without CUDA it builds the CPU environment
# described in docs/cpu-environment.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.gyges-setup-stamp"
want="$(cat scripts/setup.sh scripts/cpu-constraints.txt pyproject.toml \
        cpu_compat/sgl_kernel_stub/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
constraints="$root/scripts/cpu-constraints.txt"

# 1. torch first, pinned: the CPU wheel on these machines. Never let pip resolve torch.
"${pip[@]}" torch==2.13.0

# 2. SGLang without its dependency tree (which would pull CUDA builds), then the light deps.
"${pip[@]}" --no-deps sglang==0.5.23
"${pip[@]}" -c "$constraints" \
  transformers tokenizers safetensors fastapi "uvicorn>=0.51" uvloop "pyzmq>=25.1.2" orjson \
  msgspec aiohttp requests tqdm numpy packaging pydantic python-multipart pybase64 \
  "prometheus-client>=0.20.0" setproctitle partial_json_parser interegular einops xxhash \
  zstandard regex pillow psutil distro "python-dateutil<3" triton torchvision \
  apache-tvm-ffi IPython dill sentencepiece compressed-tensors gguf openai jsonschema \
  xgrammar soundfile datasets sglang-router matplotlib

# 3. No CPU build of sgl_kernel exists: install the import-only stand-in.
"${pip[@]}" --no-deps "$root/cpu_compat/sgl_kernel_stub"

# 4. The registry's torchvision is a CUDA build whose fake-op registrations fail to import
#    without its compiled ops: guard them (idempotent).
"$venv/bin/python" "$root/cpu_compat/guard_torchvision.py"

# 5. This project, editable (--no-deps: its runtime deps are installed above; letting pip
#    resolve sglang's own requirements would pull the CUDA stack), then its test tools.
"${pip[@]}" --no-deps -e "$root"
"${pip[@]}" -c "$constraints" pytest pytest-timeout hypothesis requests ruff

echo "$want" > "$stamp"
echo "setup: .venv ready"
