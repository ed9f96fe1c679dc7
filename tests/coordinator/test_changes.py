"""`Changes`: which held GetTask long-polls a change wakes (context.py)."""

from __future__ import annotations

import asyncio
import time

from rankfed.coordinator.context import WAKE_BATCH, Changes


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



def test_a_burst_of_wakes_lets_a_due_timer_run_between_its_batches():
    """Everyone woken at once (the federation ends) is woken WAKE_BATCH per loop turn, so a
    timer due meanwhile (another poll's WAIT) runs after the first batch, not after all."""

    async def scenario():
        state = {"done": False}
        changes = Changes()
        changes.track_phase(lambda: state["done"])
        order: list[str] = []

        async def poll(client_id: str) -> None:
            await changes.wait_task(client_id, 5.0)
            order.append(client_id)

        n = 3 * WAKE_BATCH + 7
        polls = [asyncio.ensure_future(poll(f"d{i}")) for i in range(n)]
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        loop.call_later(0, order.append, "timer")  # due at once: ready on the next loop turn
        state["done"] = True
        changes.notify()
        await asyncio.gather(*polls)
        assert len(order) == n + 1
        assert order.index("timer") <= WAKE_BATCH  # not behind every one of the n wakes
        assert set(order) == {"timer", *(f"d{i}" for i in range(n))}
        assert not changes._waiting

    asyncio.run(scenario())
