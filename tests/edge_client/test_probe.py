"""The capability probe: a median of timed runs after a warm-up, and the operator's
overrides of class and speed (flag, or $RANKFED_GFLOPS for the runner's own probes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rankfed.edge_client.probe import GFLOPS_ENV, measure_gflops, parse_gflops, probe
from rankfed.protocol import DeviceClass


def test_measured_speed_is_a_finite_positive_median():
    gflops = measure_gflops(n=64, budget_s=0.05, repetitions=3)
    assert math.isfinite(gflops) and gflops > 0
    with pytest.raises(ValueError, match="repetitions"):
        measure_gflops(repetitions=0)


def test_declared_class_and_speed_replace_the_measured_ones(monkeypatch):
    monkeypatch.delenv(GFLOPS_ENV, raising=False)
    cap = probe(declared_class=DeviceClass.MOBILE, declared_gflops=12.5, budget_s=0.05)
    assert cap.device_class is DeviceClass.MOBILE and cap.compute_gflops == 12.5
    monkeypatch.setenv(GFLOPS_ENV, "33")
    assert probe(budget_s=0.05).compute_gflops == 33.0
    monkeypatch.setenv(GFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match="RANKFED_GFLOPS = 'fast'"):
        probe(budget_s=0.05)


@pytest.mark.parametrize("text", ["0", "-3", "inf", "nan", "x"])
def test_bad_speeds_are_refused(text):
    with pytest.raises(ValueError, match="--gflops"):
        parse_gflops(text)


def test_probe_command_takes_the_overrides():
    out = subprocess.run([sys.executable, "-m", "rankfed", "edge", "probe", "--json", "--gflops", "77",
                          "--device-class", "cuda"], capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(out.stdout)
    assert data["compute_gflops"] == 77.0 and data["device_class"] == "cuda"
    bad = subprocess.run([sys.executable, "-m", "rankfed", "edge", "probe", "--gflops", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--gflops = '-1': must be a finite number > 0" in bad.stderr
