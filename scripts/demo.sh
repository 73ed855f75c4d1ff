#!/usr/bin/env bash
# The demo: sets up .venv if needed, builds a tiny model, starts a 2-replica Gyges server
# on CPU, talks to it through the OpenAI client and /generate, prints /gyges/status, and
# shuts everything down.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" "$root/examples/demo.py" "$@"
