#!/usr/bin/env bash
# Install what the tests need, then run them (CI runs exactly this).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh tests/aggregation -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The dashboard test drives Debian's chromium with playwright (no browser download:
# playwright is given executable_path=/usr/bin/chromium). Skipped when already there.
# The bad-link test (tests/edge_client/test_netns_link.py) puts the coordinator and a device
# in two network namespaces over a veth pair with a tc tbf rate limit: iproute2 (`ip`, `tc`);
# it runs as root (CI) and skips itself otherwise. Both installed only when missing.
APT_PACKAGES=""
command -v chromium >/dev/null 2>&1 || APT_PACKAGES="chromium"
if [ "$(id -u)" = 0 ] && { ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; }; then
  APT_PACKAGES="$APT_PACKAGES iproute2"
fi
if [ -n "$APT_PACKAGES" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  # shellcheck disable=SC2086  # a list of package names
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $APT_PACKAGES
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
# Lint and types first (seconds): the generated rankfed/v1 is excluded by pyproject.toml.
if [ "$#" -eq 0 ]; then
  "$PY" -m ruff check rankfed tests bench scripts
  "$PY" -m mypy rankfed
fi
exec "$PY" -m pytest -m "not slow and not soak" -q "$@"
