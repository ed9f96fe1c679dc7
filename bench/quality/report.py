"""Tables and the plot of the learning-quality benchmark, from bench/results/quality/runs/*.json.

    python bench/quality/report.py --also bench/results/quality-svdfix/runs=+fix
                                            # writes bench/results/quality.json,
                                            # bench/results/quality_accuracy.png, prints markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["homog-max", "homog-min", "zero_pad", "hetlora", "replication", "rbla", "flexlora", "flora",
         "flexlora+fix", "flora+fix"]


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    baselines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        job = r["job"]
        if job["kind"] == "federated":
            groups[(job["rule"], job["dist"], job["alpha"])].append(r)
        else:
            baselines[job["kind"]].append(r)
    configs = []
    for (rule, dist, alpha), rs in sorted(groups.items(), key=lambda kv: (kv[0][2] * -1, kv[0][1], _rank(kv[0][0]))):
        finals = [x["final_accuracy"] for x in rs if x.get("final_accuracy") is not None]
        n_rounds = max(len(x["rounds"]) for x in rs)
        curve = [_ms([x["rounds"][i]["accuracy"] for x in rs if len(x["rounds"]) > i
                      and x["rounds"][i]["accuracy"] is not None]) for i in range(n_rounds)]
        up_client = [statistics.fmean(b for rd in x["rounds"] for b in rd["bytes_up_per_client"]) for x in rs]
        down_client = [statistics.fmean(b for rd in x["rounds"] for b in rd["bytes_down_per_client"]) for x in rs]
        per_round = [statistics.fmean(rd["bytes_up"] + rd["bytes_down"] for rd in x["rounds"]) for x in rs]
        stuck = [x["id"] for x in rs if x["final_accuracy"] is not None
                 and x["final_accuracy"] <= x["majority_fraction"] + 0.02]
        configs.append({
            "rule": rule, "dist": dist, "alpha": alpha, "seeds": sorted(x["job"]["seed"] for x in rs),
            "ranks": rs[0].get("assigned_ranks"),
            "final_accuracy_mean": _ms(finals)[0], "final_accuracy_std": _ms(finals)[1],
            "final_accuracies": finals,
            "accuracy_per_round_mean": [m for m, _ in curve], "accuracy_per_round_std": [s for _, s in curve],
            "bytes_up_per_client_per_round": statistics.fmean(up_client),
            "bytes_down_per_client_per_round": statistics.fmean(down_client),
            "bytes_per_round": statistics.fmean(per_round),
            "stuck_at_majority": stuck,
            "wall_seconds_mean": statistics.fmean(x["wall_seconds"] for x in rs),
        })
    out: dict[str, Any] = {"configs": configs}
    if baselines.get("centralized"):
        cs = baselines["centralized"]
        n = max(len(x["rounds"]) for x in cs)
        out["centralized"] = {
            "final_accuracy_mean": _ms([x["final_accuracy"] for x in cs])[0],
            "final_accuracy_std": _ms([x["final_accuracy"] for x in cs])[1],
            "best_accuracy_mean": _ms([max(rd["accuracy"] for rd in x["rounds"]) for x in cs])[0],
            "accuracy_per_round_mean": [_ms([x["rounds"][i]["accuracy"] for x in cs if len(x["rounds"]) > i])[0]
                                        for i in range(n)],
            "steps_per_round": cs[0]["rounds"][0].get("steps"),
            "seeds": sorted(x["job"]["seed"] for x in cs),
        }
    if baselines.get("tfidf"):
        ts = baselines["tfidf"]
        out["tfidf"] = {
            "accuracy_truncated_mean": _ms([x["accuracy_truncated"] for x in ts])[0],
            "accuracy_truncated_std": _ms([x["accuracy_truncated"] for x in ts])[1],
            "accuracy_full_text_mean": _ms([x["accuracy_full_text"] for x in ts])[0],
            "accuracy_full_text_std": _ms([x["accuracy_full_text"] for x in ts])[1],
            "seeds": sorted(x["job"]["seed"] for x in ts),
        }
    if runs:
        out["majority_fraction"] = statistics.fmean(r["majority_fraction"] for r in runs)
        out["setup"] = runs[0]["setup"]
    return out


def _rank(rule: str) -> int:
    return ORDER.index(rule) if rule in ORDER else len(ORDER)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["alpha"], c["dist"]) for c in summary["configs"] if c["dist"] != "-"},
                    key=lambda k: (-k[0], k[1]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (alpha, dist) in zip(axes[0], panels, strict=True):
        for c in summary["configs"]:
            if c["alpha"] != alpha or c["dist"] not in (dist, "-"):
                continue
            xs = list(range(1, len(c["accuracy_per_round_mean"]) + 1))
            style = "--" if c["dist"] == "-" else (":" if "+" in c["rule"] else "-")
            ax.errorbar(xs, c["accuracy_per_round_mean"], yerr=c["accuracy_per_round_std"], label=c["rule"],
                        linestyle=style, marker="o", markersize=3, capsize=2, color=cmap(_rank(c["rule"]) % 10))
        if "centralized" in summary:
            ys = summary["centralized"]["accuracy_per_round_mean"]
            ax.plot(range(1, len(ys) + 1), ys, color="black", linewidth=2, label="centralized LoRA r16")
        if "tfidf" in summary:
            ax.axhline(summary["tfidf"]["accuracy_truncated_mean"], color="gray", linestyle="-.",
                       label="TF-IDF+LR (same tokens)")
        ax.axhline(summary.get("majority_fraction", 0.24), color="red", linewidth=0.8, linestyle=":",
                   label="majority class")
        ax.set_title(f"ranks {dist}, Dirichlet alpha={alpha:g}")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    for alpha in sorted({c["alpha"] for c in summary["configs"]}, reverse=True):
        lines += [f"\n**Dirichlet alpha = {alpha:g}**\n",
                  "| rule | ranks | final accuracy (mean ± std) | seeds | per round | up / client / round | "
                  "down / client / round | bytes / round |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in summary["configs"]:
            if c["alpha"] != alpha:
                continue
            curve = " ".join(f"{a:.2f}" for a in c["accuracy_per_round_mean"])
            ranks = c["dist"] if c["dist"] != "-" else ("all 16" if c["rule"] == "homog-max" else "all 2")
            lines.append(
                f"| {c['rule']} | {ranks} | {c['final_accuracy_mean']:.3f} ± {c['final_accuracy_std']:.3f} | "
                f"{len(c['seeds'])} | {curve} | {c['bytes_up_per_client_per_round'] / 1024:.0f} KiB | "
                f"{c['bytes_down_per_client_per_round'] / 1024:.0f} KiB | {c['bytes_per_round'] / 1024 / 1024:.2f} MiB |")
    if "centralized" in summary:
        c = summary["centralized"]
        lines.append(f"\ncentralized LoRA r16: final {c['final_accuracy_mean']:.3f} ± {c['final_accuracy_std']:.3f}, "
                     f"best round {c['best_accuracy_mean']:.3f}, per round "
                     + " ".join(f"{a:.2f}" for a in c["accuracy_per_round_mean"]))
    if "tfidf" in summary:
        t = summary["tfidf"]
        lines.append(f"TF-IDF + LR: {t['accuracy_truncated_mean']:.3f} ± {t['accuracy_truncated_std']:.3f} on the same "
                     f"first tokens, {t['accuracy_full_text_mean']:.3f} ± {t['accuracy_full_text_std']:.3f} on full text")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "bench" / "results" / "quality" / "runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    p.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "quality_accuracy.png")
    p.add_argument("--also", action="append", default=[], metavar="DIR=SUFFIX",
                   help="more runs (e.g. a later commit's), their rules renamed RULE+SUFFIX")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    for item in args.also:
        where, _, suffix = item.partition("=")
        for r in load_runs(Path(where)):
            r["job"]["rule"] += suffix
            runs.append(r)
    summary = summarize(runs)
    args.out.write_text(json.dumps(summary, indent=1))
    plot(summary, args.plot)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
