"""`Changes`: which held GetTask long-polls a change wakes (context.py)."""

from __future__ import annotations

import asyncio
import time

from rankfed.coordinator.context import Changes


def test_a_phase_change_wakes_only_its_audience_and_the_end_wakes_everyone():
    async def scenario():
        state = {"phase": 0, "audience": frozenset({"a"}), "done": False}
        changes = Changes()
        changes.track_phase(lambda: (state["done"], state["phase"]),
                            audience=lambda: None if state["done"] else state["audience"])
        woke: dict[str, float] = {}

        async def poll(client_id: str, timeout: float) -> None:
            start = time.monotonic()
            await changes.wait_task(client_id, timeout)
            woke[client_id] = time.monotonic() - start

        polls = [asyncio.ensure_future(poll(c, 5.0)) for c in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        changes.notify()  # nothing changed: nobody wakes
        await asyncio.sleep(0.05)
        assert woke == {}
        state["phase"] = 1  # a round starts with "a" among its participants
        changes.notify()
        await asyncio.sleep(0.05)
        assert set(woke) == {"a"} and woke["a"] < 1.0
        state["done"] = True  # the federation ends: every held poll learns it
        changes.notify()
        await asyncio.gather(*polls)
        assert set(woke) == {"a", "b", "c"} and max(woke.values()) < 1.0
        assert not changes._waiting  # nothing left behind

    asyncio.run(scenario())


def test_a_poll_that_times_out_leaves_nothing_behind():
    async def scenario():
        changes = Changes()
        changes.track_phase(lambda: 0, audience=lambda: ())
        await asyncio.gather(changes.wait_task("a", 0.05), changes.wait_task("a", 0.1))
        assert not changes._waiting

    asyncio.run(scenario())

