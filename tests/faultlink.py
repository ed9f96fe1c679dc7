"""A bad link for tests and benches: a TCP relay on loopback between a client and a server
that forwards bytes both ways and, on request, cuts every connection after N more bytes,
throttles, stalls (a black hole: bytes wait, connections stay) or goes down (connections
reset, new ones refused) and up again.

    link = FaultyLink("127.0.0.1:50051").start()        # clients dial link.address
    link.cut_after(up=[600_000])                        # reset once 600 kB went client -> server
    link.fail_after("up", 600_000, "down")              # ... and stay down until link.up()
    link.fail_after("up", 600_000, "stall")             # ... or carry nothing until link.up()
    link.throttle(2 * 1024 * 1024)                      # 2 MiB/s each way
    link.down(); ...; link.up()
    link.close()

No kernel help (no netem, no root): an asyncio relay in a thread of its own. A cut resets
both sides (SO_LINGER 0, so an RST, as a NAT box or a dropped radio link does) at the
exact byte; the relay counts what it forwarded (`bytes_up`, `bytes_down`) and the faults
it injected (`cuts`, `stalls`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any

PIECE = 16 * 1024  # forwarding granularity: where a cut or the throttle can act


async def _call(fn: Any) -> None:
    fn()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter | None) -> None:
        self.client, self.server = client, server

    def reset(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultyLink:
    def __init__(self, target: str, *, listen_host: str = "127.0.0.1") -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listen_host = listen_host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="faultlink")
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing: asyncio.Event | None = None
        self._refusing = False
        # (cumulative byte mark, action) still armed per direction, counted from arming
        self._marks: dict[str, list[tuple[int, str]]] = {"up": [], "down": []}
        self._rate: float | None = None
        self.address = ""
        self.bytes_up = 0  # client -> server, forwarded
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0  # connections reset by a "cut" or "down" mark
        self.stalls = 0
        self._since_arm = {"up": 0, "down": 0}

    # ------------------------------------------------------------------ life cycle

    def start(self) -> FaultyLink:
        self._thread.start()
        self._run(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultyLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ faults

    def cut_after(self, *, up: list[int] | None = None, down: list[int] | None = None) -> None:
        """Reset every connection each time the bytes forwarded in that direction, counted
        from now, reach the next mark."""
        for direction, marks in (("up", up), ("down", down)):
            if marks is not None:
                self._arm(direction, [(mark, "cut") for mark in marks])

    def fail_after(self, direction: str, nbytes: int, action: str) -> None:
        """Once `nbytes` more went that way: "cut" (reset), "down" (reset, then refuse
        connections until up()) or "stall" (carry nothing until up())."""
        assert action in ("cut", "down", "stall"), action
        self._arm(direction, [(nbytes, action)])

    def _arm(self, direction: str, marks: list[tuple[int, str]]) -> None:
        def arm() -> None:
            self._marks[direction] = sorted(marks)
            self._since_arm[direction] = 0
        self._run(_call(arm))

    def throttle(self, bytes_per_second: float | None) -> None:
        """Each direction at most this fast (None: as fast as loopback goes)."""
        self._loop.call_soon_threadsafe(setattr, self, "_rate", bytes_per_second)

    def down(self) -> None:
        """The link goes away: every connection is reset and new ones are refused."""
        self._run(self._down())

    def stall(self) -> None:
        """The link stops carrying bytes; connections stay open (TCP would retransmit)."""
        self._run(self._set_flowing(False))

    def up(self) -> None:
        """Back to normal after down() or stall()."""
        self._run(self._up())

    def reset_all(self) -> None:
        """Reset every open connection once (a NAT rebinding, a radio handover)."""
        self._run(self._reset_all())

    # ------------------------------------------------------------------ relay (loop thread)

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self._listen_host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{self._listen_host}:{port}"

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _down(self) -> None:
        self._refusing = True
        await self._reset_all()

    async def _up(self) -> None:
        self._refusing = False
        await self._set_flowing(True)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _reset_all(self) -> None:
        for conn in list(self._conns):
            conn.reset()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _reset(writer)
            return
        conn = _Conn(writer, up_writer)
        self._conns.add(conn)
        self.connections += 1
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, "up", conn), self._pump(up_reader, writer, "down", conn),
            )
        finally:
            if conn in self._conns:  # both ends closed: close ours politely
                self._conns.discard(conn)
                writer.close()
                up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                    conn: _Conn) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(64 * 1024):
                while data:
                    await self._flowing.wait()
                    if conn not in self._conns:
                        return
                    piece, action = self._budget(direction, data[:PIECE])
                    data = data[len(piece) :]
                    if self._rate:
                        await asyncio.sleep(len(piece) / self._rate)
                    writer.write(piece)
                    self._count(direction, len(piece))
                    if action == "stall":  # the rest waits for up()
                        self.stalls += 1
                        self._flowing.clear()
                    elif action is not None:
                        await writer.drain()
                        self.cuts += 1
                        self._refusing = action == "down"
                        await self._reset_all()
                        return
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            conn.reset()
            self._conns.discard(conn)

    def _budget(self, direction: str, piece: bytes) -> tuple[bytes, str | None]:
        """The part of `piece` to forward, and the fault to inject right after it (if any)."""
        marks = self._marks[direction]
        if not marks:
            return piece, None
        left = marks[0][0] - self._since_arm[direction]
        if len(piece) < left:
            return piece, None
        _, action = marks.pop(0)
        return piece[: max(left, 0)], action

    def _count(self, direction: str, n: int) -> None:
        self._since_arm[direction] += n
        if direction == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n
