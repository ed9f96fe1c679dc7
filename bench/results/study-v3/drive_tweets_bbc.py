"""The wrapper that ran study v3's committed grids for tweets and BBC (stop 20), kept as
the record of what ran: from a worktree of f0f20de, H0 on both tasks first (the
preregistered order), then the rules on each task named on the command line where H0's
mean reached 5 points (neither did), without FedAvg-of-updates (removed after WordNet's
H5). Run as `cd /work/wt-study3 && OMP_NUM_THREADS=1 python <this file> tweets`; its log
is drive_tweets_bbc.log. Only whitespace and line breaks differ from the file that ran."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, "/work/wt-study3/bench/quality")
import study_v3 as s  # noqa: E402

out = Path("/work/main/bench/results/study-v3")
cache = out.parent / "study-cache"
lrs = s.tuned(out)
print("lrs", lrs, flush=True)
pool = ThreadPoolExecutor(2)


def go(runs):
    for line in pool.map(lambda r: s.run(r[0], r[1], out, cache), runs):
        print(line, flush=True)


go(s.h0_grid("tweets", lrs) + s.h0_grid("bbc", lrs))


def h0(task):
    d = []
    for seed in s.SEEDS:
        a = [json.loads((out / task / f"homog-r{r}-s{seed}" / "summary.json").read_text())["final"]["test"]["accuracy"]
             for r in (16, 2)]
        d.append(100 * (a[0] - a[1]))
    return sum(d) / len(d), d


for task in sys.argv[1:]:
    mean, d = h0(task)
    print(task, "H0", mean, d, flush=True)
    if mean >= 5:
        go([r for r in s.rules_grid(task, lrs) if "fedavg_updates" not in r[0]])
