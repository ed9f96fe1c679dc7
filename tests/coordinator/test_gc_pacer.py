"""GcPacer: objects older than a beat are frozen (young collections skip them), and a full
collection at its interval still frees the garbage cycles among them."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from rankfed.coordinator.gc_pacer import GcPacer


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture(autouse=True)
def _thawed():
    gc.unfreeze()  # nothing frozen before: what the test sees frozen, the pacer froze
    yield
    gc.unfreeze()  # leave the test process as it was


def test_frozen_objects_are_skipped_until_the_full_collection_frees_their_cycles():
    async def scenario() -> tuple[GcPacer, list[bool]]:
        clock = [0.0]
        pacer = GcPacer(full_every=10.0, freeze_every=0.01, clock=lambda: clock[0])
        task = asyncio.create_task(pacer.run())
        node = _Node()
        alive = weakref.ref(node)
        del node  # garbage now, but only as a cycle
        assert gc.get_freeze_count() == 0
        await asyncio.sleep(0.05)  # a few beats: the cycle is frozen
        seen = [gc.get_freeze_count() > 0]
        gc.collect()  # what any automatic collection does: it skips the frozen cycle
        seen.append(alive() is not None)
        clock[0] = 11.0  # the full collection is due
        await asyncio.sleep(0.05)
        seen.append(alive() is None)
        task.cancel()
        return pacer, seen

    pacer, (frozen, skipped, freed) = asyncio.run(scenario())
    assert frozen and skipped and freed
    assert pacer.full_collections == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GcPacer(full_every=0)
