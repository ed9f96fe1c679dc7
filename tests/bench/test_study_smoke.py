"""A CI-sized smoke of the study pipeline (bench/quality/study.py): tiny fleets through
`rankfed simulate`, then the paired report over seeds, on a tiny model in seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rankfed.aggregation import METHODS
from rankfed.simulation.driver import simulate
from rankfed.simulation.fleet import load_fleet
from tests.simulation.test_simulate import _settings, tiny  # noqa: F401 - the module fixture

STUDY = Path(__file__).resolve().parents[2] / "bench" / "quality" / "study.py"
REMOVED_AFTER_V3 = {"fedavg_updates"}  # rules study v3 ran that the product no longer has


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDY.with_name(f"{name}.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_pipeline_runs_and_reports_paired_differences(tiny, tmp_path):  # noqa: F811
    model, data = tiny
    study = _load("study")
    assert len(study.grid(5e-3)) == len(study.SEEDS) * 14  # the preregistered grid
    out = tmp_path / "study"
    for seed in (0, 1):
        for name, extra in (("homog-r16", {"devices.profiles": {"cuda-large": 1.0}}),
                            ("homog-r2", {"devices.profiles": {"mobile": 1.0}}),
                            ("rbla-aligned", {"devices.assignment": "aligned", "data.quality_fraction": 0.25}),
                            ("zero_pad-aligned", {"method": "zero_pad", "devices.assignment": "aligned",
                                                  "data.quality_fraction": 0.25})):
            fleet = load_fleet(None, _settings(model, data, **{"seed": seed, "rounds": 1, **extra}))
            simulate(fleet, out / f"{name}-s{seed}", progress=None)
    result = study.report(out)
    h0 = result["hypotheses"]["H0 homog r16 - r2 >= 5"]
    assert h0["seeds"] == [0, 1] and len(h0["diff_points"]) == 2
    acc = {r["config"]: r["test_acc"] for r in result["rows"]}
    assert abs(h0["mean"] - 100 * (sum(acc["homog-r16"]) - sum(acc["homog-r2"])) / 2) < 1e-9
    assert result["hypotheses"]["H1 aligned: rbla - zero_pad >= 2"]["seeds"] == [0, 1]
    assert json.loads((out / "report.json").read_text())["rows"]


def test_study_v3_every_arm_runs_and_the_report_pairs_seeds_per_task(tiny, tmp_path):  # noqa: F811
    """Each arm's exact --set strings (fixed alpha, aligned ranks, validation allocation) run on the tiny model, and the per-task report pairs them."""
    model, data = tiny
    v3 = _load("study_v3")
    lrs = {"r2": 1e-2, "r16": 1e-2, "shared": 1e-2}
    runs = v3.h0_grid("wordnet", lrs) + v3.rules_grid("wordnet", lrs)
    assert len(runs) == len(v3.SEEDS) * 10
    out = tmp_path / "v3"
    for name, sets in runs:
        if not (name.endswith("-s0") or name.endswith(("validation-s1", "homog-r4-s1"))):
            continue  # every arm once, and one pair on a second seed for the paired report
        # The grid is the record of what study v3 ran; a rule removed from the product since
        # (fedavg_updates, H5) no longer runs, so its arm is skipped here, not its name dropped.
        method = next(x.split("=", 1)[1].strip('"') for x in sets if x.startswith("method="))
        if method not in METHODS:
            assert method in REMOVED_AFTER_V3, f"{name}: unknown method {method!r}"  # a typo is not skipped
            continue
        rounds = 2 if "validation" in name else 1  # allocation starts after the warm-up round
        base = _settings(model, data, **{"rounds": rounds, "data.quality_fraction": 0.25})
        arm_keys = {s.split("=", 1)[0] for s in sets}  # overrides win over sets: keep only the tiny-fleet ones
        fleet = load_fleet(None, {k: v for k, v in base.items() if k not in arm_keys}, sets)
        assert fleet.eval.every == 10
        assert fleet.federation.coordinator["lora.alpha_rule"] == "fixed"
        simulate(fleet, out / name, progress=None)
    validation = [json.loads(x) for x in (out / "wordnet" / "zero_pad-validation-s0" / "rounds.jsonl").read_text().splitlines()]
    assert set(validation[0]["ranks"]) == {16}  # warm-up: the capability rank
    assert 2 in validation[1]["ranks"] and set(validation[1]["ranks"]) <= {2, 16}  # scored: top 20 % high, the rest low
    result = v3.report(out)["wordnet"]
    h4 = result["hypotheses"]["H4 validation allocation - homog r4 > 0"]
    assert h4["seeds"] == [0, 1]
    acc = {r["config"]: r["test_acc"] for r in result["rows"]}
    assert abs(h4["mean"] - 100 * (sum(acc["zero_pad-validation"]) - sum(acc["homog-r4"])) / 2) < 1e-9
    assert (out / "report.json").is_file()


def test_centralized_reference_trains_on_the_pooled_fleet_and_picks_lr_on_validation(tiny, tmp_path):  # noqa: F811
    """The centralized reference pools exactly the devices' data (flipped labels included),
    scores only validation when tuning, and the report takes the lr from validation alone."""
    model, data = tiny
    central = _load("centralized_v3")
    fleet = load_fleet(None, _settings(model, data, **{"seed": 1, "data.label_noise": 0.3,
                                                        "data.quality_fraction": 0.25,
                                                        "training.freeze_below_layer": 1}))
    tuned = central.train_centralized(fleet, 1e-2, test=False, cache_dir=tmp_path / "cache", rounds=2,
                                      steps_per_round=3, eval_rounds=(1, 2))
    assert tuned["train_examples"] == 8 * 30 and tuned["steps"] == 6
    assert [r["round"] for r in tuned["rounds"]] == [1, 2] and "test" not in tuned["final"]
    scored = central.train_centralized(fleet, 1e-2, test=True, cache_dir=tmp_path / "cache", rounds=1,
                                       steps_per_round=3, eval_rounds=(1,))
    assert 0.0 <= scored["final"]["test"]["accuracy"] <= 1.0
    # Train and validation states kept by the first run and reused by the second, which adds test.
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3

    # The report: lr by validation on the tuning seed only, test over the seeds run at it.
    out = tmp_path / "out"
    for lr, val in zip(central.LRS, (0.5, 0.7, 0.6), strict=True):
        central._save(out, {"task": "wordnet", "seed": central.TUNE_SEED, "learning_rate": lr,
                            "final": {"validation": {"accuracy": val}}})
    for seed, acc in ((0, 0.60), (1, 0.64)):
        central._save(out, {"task": "wordnet", "seed": seed, "learning_rate": central.LRS[1],
                            "final": {"test": {"accuracy": acc}}})
    central._save(out, {"task": "wordnet", "seed": 2, "learning_rate": central.LRS[0],  # not the chosen lr
                        "final": {"test": {"accuracy": 0.99}}})
    row = central.report(out)["wordnet"]
    assert row["learning_rate"] == central.LRS[1] and sorted(row["test_by_seed"]) == [0, 1]
    assert abs(row["mean"] - 62.0) < 1e-9
