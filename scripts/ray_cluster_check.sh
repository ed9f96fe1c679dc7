#!/usr/bin/env bash
# A real multi-node Ray cluster shape on one machine: a head and a worker started by
# `ray start` as separate processes (one CPU each, resources split between them), then
# `rankfed simulate --ray-address` against it. Prints where each actor ran.
#   bash scripts/ray_cluster_check.sh [FLEET]     (default: examples/fleets/ray-cluster.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
FLEET=${1:-examples/fleets/ray-cluster.toml}
OUT=$(mktemp -d /tmp/rankfed-ray-cluster.XXXXXX)
PORT=${RAY_PORT:-6389}
# Ray 2.60 authenticates the nodes of a cluster with a shared token (~/.ray/auth_token here;
# on real nodes, copy it to each one or set RAY_AUTH_TOKEN).
export RAY_AUTH_MODE=token
[ -f "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
cleanup() { ray stop --force >/dev/null 2>&1 || true; }
trap cleanup EXIT
ray start --head --num-cpus 1 --port "$PORT" --include-dashboard=false --disable-usage-stats >/dev/null
ray start --address "127.0.0.1:$PORT" --num-cpus 1 --disable-usage-stats >/dev/null
python - "$PORT" <<'PY'
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(f"cluster: {len(nodes)} nodes, CPUs per node {[n['Resources'].get('CPU') for n in nodes]}")
ray.shutdown()
PY
rankfed simulate "$FLEET" --ray-address "127.0.0.1:$PORT" --out "$OUT/run" --set backend.kind='"ray"'
python - "$OUT/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
nodes = {w.get("node_id") for w in s["workers"]}
print(f"actors: {len(s['workers'])} on {len(nodes)} Ray nodes; rounds done {s['rounds_done']}/{s['rounds']}; "
      f"final test accuracy {s['final']['test']['accuracy'] if s['final'] else None}")
sys.exit(0 if len(nodes) == 2 and s["rounds_done"] == s["rounds"] else 1)
PY
