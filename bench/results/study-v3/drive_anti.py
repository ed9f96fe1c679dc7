"""Study v3 amendment (stop 20): zero padding and RBLA under anti-aligned ranks on WordNet,
seeds 0-4, with the rules grid's exact settings, from a worktree of f0f20de."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, "/work/wt-study3/bench/quality")
import study_v3 as s  # noqa: E402

out = Path("/work/main/bench/results/study-v3")
cache = out.parent / "study-cache"
lrs = s.tuned(out)
runs = []
for seed in s.SEEDS:
    common = s.base_sets(seed, lrs["shared"])
    for rule in ("zero_pad", "rbla"):
        runs.append((f"wordnet/{rule}-anti-s{seed}", [*common, f'method="{rule}"', 'devices.assignment="anti-aligned"',
                                                      s.coordinator()]))
with ThreadPoolExecutor(2) as pool:
    for line in pool.map(lambda r: s.run(r[0], r[1], out, cache), runs):
        print(line, flush=True)
