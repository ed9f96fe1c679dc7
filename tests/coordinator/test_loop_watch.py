"""LoopWatch: the loop's lag as a number, and a stall reported once with what held the loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from rankfed.coordinator.loop_watch import LoopWatch


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a slow synchronous call on the loop does


def test_a_stall_is_logged_once_with_the_stack_that_held_the_loop_and_its_length(caplog):
    lags: list[float] = []

    async def scenario() -> LoopWatch:
        watch = LoopWatch(interval=0.01, stall_seconds=0.15, on_lag=lags.append)
        watch.start()
        await asyncio.sleep(0.1)  # keeping time: nothing to report
        assert watch.stalls == 0
        _hold_the_loop(0.5)
        await asyncio.sleep(0.1)
        await watch.stop()
        return watch

    with caplog.at_level(logging.WARNING, logger="rankfed.coordinator"):
        watch = asyncio.run(scenario())
    assert watch.stalls == 1
    stalled = [r for r in caplog.records if r.getMessage() == "event loop stalled"]
    ended = [r for r in caplog.records if r.getMessage() == "event loop stall ended"]
    assert len(stalled) == 1 and len(ended) == 1
    assert "_hold_the_loop" in stalled[0].loop_stack  # type: ignore[attr-defined]
    assert 0.4 <= ended[0].stalled_for_s <= 2.0  # type: ignore[attr-defined]
    assert max(lags) >= 0.4  # the beat after the stall woke that late


def test_an_idle_loop_reports_no_stall(caplog):
    async def scenario() -> LoopWatch:
        watch = LoopWatch(interval=0.01, stall_seconds=0.2)
        watch.start()
        await asyncio.sleep(0.3)
        await watch.stop()
        return watch

    with caplog.at_level(logging.WARNING, logger="rankfed.coordinator"):
        assert asyncio.run(scenario()).stalls == 0
    assert not [r for r in caplog.records if "stall" in r.getMessage()]


def test_garbage_collections_are_timed_while_it_watches():
    async def scenario() -> LoopWatch:
        watch = LoopWatch(interval=0.01, stall_seconds=1.0)
        watch.start()
        junk = [[i] for i in range(200_000)]  # something for a full collection to walk
        gc.collect()
        del junk
        await watch.stop()
        return watch

    watch = asyncio.run(scenario())
    assert watch.gc_seconds > 0
    assert watch._on_gc not in gc.callbacks  # stop() unhooks it


def test_with_stall_logging_off_the_lag_is_still_measured_and_nothing_watches(caplog):
    lags: list[float] = []

    async def scenario() -> LoopWatch:
        watch = LoopWatch(interval=0.01, stall_seconds=0, on_lag=lags.append)
        watch.start()
        await asyncio.sleep(0.05)
        _hold_the_loop(0.3)
        await asyncio.sleep(0.05)
        assert watch._thread is None and watch._on_gc not in gc.callbacks
        await watch.stop()
        return watch

    with caplog.at_level(logging.WARNING, logger="rankfed.coordinator"):
        assert asyncio.run(scenario()).stalls == 0
    assert not [r for r in caplog.records if "stall" in r.getMessage()]
    assert max(lags) >= 0.2  # the beat after the held loop woke that late


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LoopWatch(interval=0)
    with pytest.raises(ValueError):
        LoopWatch(stall_seconds=-1)
