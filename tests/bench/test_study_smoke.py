"""A CI-sized smoke of the study pipeline (bench/quality/study.py): tiny fleets through
`rankfed simulate`, then the paired report over seeds, on a tiny model in seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rankfed.simulation.driver import simulate
from rankfed.simulation.fleet import load_fleet
from tests.simulation.test_simulate import _settings, tiny  # noqa: F401 - the module fixture

STUDY = Path(__file__).resolve().parents[2] / "bench" / "quality" / "study.py"


def _study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_pipeline_runs_and_reports_paired_differences(tiny, tmp_path):  # noqa: F811
    model, data = tiny
    study = _study()
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
