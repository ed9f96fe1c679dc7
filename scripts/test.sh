#!/usr/bin/env bash
# Install what the tests need, then run them (CI runs exactly this).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh tests/aggregation -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python3}" -m pytest -m "not slow and not soak" -q "$@"
