#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest. Extra arguments go to pytest:
#   bash scripts/test.sh -m "not server"   # fast tier (no SGLang server), about a minute
#   bash scripts/test.sh -m slow           # the slow tier CI leaves out (more architectures)
#   bash scripts/test.sh -m ""             # everything
# Without -m it runs everything but the slow tier (what CI runs). A later -m replaces it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider -m "not slow" "$@"
