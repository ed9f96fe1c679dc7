"""The live dashboard, end to end: a real coordinator, two real `rankfed edge run`
processes training the tiny BERT, and headless Chromium (Debian's `chromium`, driven by
playwright with executable_path) watching the page update by itself from round 0 to the
end. Plus the HTTP-level checks: credentials, the JSON state and the event stream.

The screenshot goes to $RANKFED_TEST_ARTIFACTS (default: the test's tmp dir); its path is
printed."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.coordinator.harness import CoordinatorThread, make_config

CHROMIUM = os.environ.get("RANKFED_CHROMIUM", "/usr/bin/chromium")
# A closed network: no updates, no sync, no first-run pages; a fresh profile per test.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def test_dashboard_needs_operator_credentials_and_serves_state_and_events(start):
    server = start(**{"server.metrics_address": "127.0.0.1:0", "server.admin_token": "s3cret"})
    base = f"http://127.0.0.1:{server.coordinator.metrics_port}"
    for path in ("/dashboard", "/dashboard/state", "/dashboard/events"):
        code, body = _get(base + path)
        assert code == 403 and b"server.admin_token" in body, (path, body)
        assert _get(base + path + "?token=wrong")[0] == 403
    code, page = _get(base + "/dashboard?token=s3cret")
    assert code == 200 and b"/dashboard/app.js" in page
    code, body = _get(base + "/dashboard/state", {"Authorization": "Bearer s3cret"})
    state = json.loads(body)
    assert code == 200 and state["federation_id"] == server.federation.federation_id
    assert state["current"]["phase"] == "waiting_for_clients" and state["devices"] == []
    # Static files carry no data and need no token; nothing else is served.
    assert _get(base + "/dashboard/app.js")[0] == 200
    assert _get(base + "/dashboard/../../etc/passwd")[0] == 404
    # The event stream: headers, then the state as the first event.
    request = urllib.request.Request(base + "/dashboard/events?token=s3cret")
    with urllib.request.urlopen(request, timeout=10) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        lines = iter(stream)
        first = next(line for line in lines if line.startswith(b"data: "))
        assert json.loads(first[len(b"data: "):])["total_rounds"] == 2


def test_dashboard_without_admin_token_serves_loopback(start):
    server = start(**{"server.metrics_address": "127.0.0.1:0"})
    code, body = _get(f"http://127.0.0.1:{server.coordinator.metrics_port}/dashboard/state")
    assert code == 200 and json.loads(body)["devices"] == []


def _browser_missing() -> str:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (scripts/test.sh installs it)"
    if not shutil.which(CHROMIUM):
        return f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium)"
    return ""


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "browser present")
def test_dashboard_shows_the_live_federation_in_chromium(tmp_path, capsys):
    from playwright.sync_api import expect, sync_playwright

    from rankfed.edge_client.manifest import build_manifest, write_manifest
    from tests.edge_client.conftest import make_bert_dir, write_cls_data

    model = make_bert_dir(tmp_path / "tiny-bert")
    data = write_cls_data(tmp_path / "train.jsonl")
    manifest = tmp_path / "manifest.json"
    write_manifest(build_manifest(model, task="sequence-classification", num_labels=3,
                                  target_modules=("query", "value")), manifest)
    server = CoordinatorThread(make_config(
        tmp_path / "state", **{
            "model.manifest": str(manifest), "server.metrics_address": "127.0.0.1:0",
            "federation.min_clients": 2, "federation.rounds": 2, "federation.local_steps": 3,
            "federation.batch_size": 8, "federation.round_deadline_seconds": 120.0,
            "federation.straggler_grace_seconds": 60.0, "federation.heartbeat_timeout_seconds": 60.0,
        }))
    devices: list[subprocess.Popen] = []
    logs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{server.coordinator.metrics_port}/dashboard"
    shots = Path(os.environ.get("RANKFED_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            # Before any device: round 0 of 2, waiting, no rows, and the stream is live.
            expect(page.locator("#connection")).to_have_text("live", timeout=30_000)
            expect(page.locator("#round")).to_have_text("1 / 2")  # round 1 waits for clients
            expect(page.locator("#phase")).to_have_text("waiting for clients")
            expect(page.locator("#devices tbody tr")).to_have_count(0)
            for name, device_class in (("laptop", "cpu"), ("phone", "mobile")):
                logs.append(open(tmp_path / f"{name}.log", "wb"))
                devices.append(subprocess.Popen(
                    [sys.executable, "-m", "rankfed", "edge", "run", "--coordinator", server.address,
                     "--model", str(model), "--data", str(data), "--device-name", name,
                     "--device-class", device_class, "--gflops", "10", "--threads", "1", "--max-wait", "2",
                     "--quiet"],
                    stdout=subprocess.DEVNULL, stderr=logs[-1], env=env,
                ))
            # The page updates by itself (no reload): devices with class and rank appear...
            rows = page.locator("#devices tbody tr")
            expect(rows).to_have_count(2, timeout=120_000)
            laptop = page.locator('#devices tr[data-device="laptop"] td')
            expect(laptop.nth(1)).to_have_text("cpu")
            expect(laptop.nth(3)).to_have_text("4")  # default tier "cpu" gives rank 4
            phone = page.locator('#devices tr[data-device="phone"] td')
            expect(phone.nth(1)).to_have_text("mobile")
            expect(phone.nth(3)).to_have_text("2")
            # ... round 1 trains, then round 2, then the federation ends, each shown live.
            expect(page.locator("#phase")).to_have_text("training", timeout=120_000)
            expect(page.locator("#round")).to_have_text("2 / 2", timeout=180_000)
            expect(page.locator("#phase")).to_have_text("done (federation finished)", timeout=180_000)
            expect(page.locator("#rounds tbody tr")).to_have_count(2)
            expect(page.locator("#chart-loss polyline")).to_have_count(1)
            expect(page.locator("#chart-bytes rect")).to_have_count(2)
            expect(laptop.nth(5)).to_have_text("uploaded")
            assert float(laptop.nth(7).inner_text().split()[0]) > 0  # MiB up in the last round
            shot = shots / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        with capsys.disabled():
            print(f"\ndashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000
        for proc in devices:
            assert proc.wait(120) == 0
    finally:
        for proc in devices:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for log in logs:
            log.close()
        server.stop()


def test_dashboards_woken_by_one_change_share_one_event(monkeypatch):
    """Each event reads every registered device: the open dashboards get one made per view."""
    from rankfed.coordinator import dashboard, http
    from rankfed.coordinator.metrics import CoordinatorMetrics

    made = []
    monkeypatch.setattr(dashboard, "snapshot", lambda federation, view: made.append(view) or {"n": len(made)})
    view, other = object(), object()

    async def scenario():
        routes = http._Routes(CoordinatorMetrics(), None, "")
        # two dashboards woken by the same change, at once: one snapshot, made off the loop
        first, again = await asyncio.gather(routes.event(None, view), routes.event(None, view))  # type: ignore[arg-type]
        assert again is first and first == b'data: {"n": 1}\n\n' and made == [view]
        assert await routes.event(None, other) == b'data: {"n": 2}\n\n' and made == [view, other]  # type: ignore[arg-type]

    asyncio.run(scenario())
