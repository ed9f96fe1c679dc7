#!/usr/bin/env bash
# Install what the tests need, then run them (CI runs exactly this).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh tests/aggregation -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The dashboard test drives Debian's chromium with playwright (no browser download:
# playwright is given executable_path=/usr/bin/chromium). Skipped when already there.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
# Lint and types first (seconds): the generated rankfed/v1 is excluded by pyproject.toml.
if [ "$#" -eq 0 ]; then
  "$PY" -m ruff check rankfed tests bench scripts
  "$PY" -m mypy rankfed
fi
exec "$PY" -m pytest -m "not slow and not soak" -q "$@"
