"""The edge servicer's upload-stream watchdog (`TimedStream`, servicer_edge.py)."""

from __future__ import annotations

import asyncio

from rankfed.coordinator.servicer_edge import TimedStream


def test_an_upload_stream_watchdog_stops_with_the_stream_and_never_spins():
    """TimedStream (servicer_edge.py): once the client sent everything, the server's own
    work (verify, fsync, receipt) is not timed as the client's; and past the total limit
    between two messages the watchdog does not re-fire at once, forever."""
    class Counted(TimedStream):
        fired = 0

        def _watch(self) -> None:
            Counted.fired += 1
            super()._watch()

    async def messages(n: int, pause: float = 0.0):
        for i in range(n):
            yield i
            await asyncio.sleep(pause)

    async def scenario():
        stream = Counted(messages(2), idle=0.05, total=0.1)
        assert await stream.next() == 0 and await stream.next() == 1 and await stream.next() is None
        await asyncio.sleep(0.3)  # the server verifies and stores past both limits
        assert stream._timer is None and Counted.fired == 0
        Counted.fired = 0
        stream = Counted(messages(3), idle=1.0, total=0.1)
        assert await stream.next() == 0
        await asyncio.sleep(0.3)  # the handler works on a chunk past the total limit
        assert Counted.fired <= 2
        try:
            await stream.next()
        except Exception as exc:  # noqa: BLE001 - the type is the servicer's
            assert "longer than" in str(exc)
        else:
            raise AssertionError("a stream past its total limit must be refused")
        stream.close()

    asyncio.run(scenario())
