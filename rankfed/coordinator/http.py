"""The coordinator's small HTTP listener (`server.metrics_address`): Prometheus metrics and
the live dashboard. Plain asyncio on the daemon's event loop, so the dashboard reads the
federation directly, with no thread and no web framework in the core install.

    GET /metrics                 Prometheus exposition (open, like any scrape target)
    GET /, /healthz              "ok"
    GET /dashboard               the dashboard page          (operator credentials)
    GET /dashboard/state         its state as JSON           (operator credentials)
    GET /dashboard/events        the same, as Server-Sent Events on every status change
    GET /dashboard/app.js, .css  the page's script and style (static, no data)

Operator credentials, as for AdminService: with `server.admin_token` set, the request must
carry it as `Authorization: Bearer <token>` or `?token=<token>` (a browser's EventSource
cannot set headers); without one, only loopback callers are served. The listener is plain
HTTP, so operator certificates (mutual TLS) do not apply here: keep it on loopback or a
private network, or put a TLS proxy in front (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from rankfed.coordinator import dashboard
from rankfed.coordinator.metrics import CONTENT_TYPE, CoordinatorMetrics

if TYPE_CHECKING:
    from rankfed.coordinator.federation import Federation
    from rankfed.protocol import FederationStatus

log = logging.getLogger("rankfed.coordinator")

_MAX_REQUEST_BYTES = 8192
_REQUEST_TIMEOUT = 5.0
_KEEPALIVE_SECONDS = 15.0  # an SSE comment this often finds dead browsers and keeps proxies open
_MAX_EVENT_STREAMS = 32  # each open dashboard holds one; bounded like every other input


@dataclass
class HttpListener:
    """A running listener; `close()` also ends open event streams (asyncio's wait_closed
    would otherwise wait for every browser tab to go away)."""

    server: asyncio.Server
    port: int
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        self.server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.server.wait_closed()


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    peer_loopback: bool


class _Routes:
    def __init__(self, metrics: CoordinatorMetrics, federation: Federation | None, admin_token: str) -> None:
        self.metrics = metrics
        self.federation = federation
        self.admin_token = admin_token
        self.streams = 0
        self._event: tuple[FederationStatus, asyncio.Future[bytes]] | None = None  # the last view's `data:` line

    async def event(self, federation: Federation, view: FederationStatus) -> bytes:
        """The `data:` line of a view, made once for every open dashboard it is sent to (the
        streams woken by one change share one view, Federation.watch), in a thread: each is
        a read of every registered device, ~170 ms with 10,000 of them, which the event
        loop must not wait for."""
        made = self._event
        if made is None or made[0] is not view:  # it holds the view: its id is not reused
            made = self._event = (view, asyncio.ensure_future(asyncio.to_thread(_event_line, federation, view)))
        return await asyncio.shield(made[1])  # a dashboard that closes does not cancel the others' line

    def authorized(self, request: _Request) -> tuple[bool, str]:
        """(allowed, why not): the operator API's rule, for a plain-HTTP caller."""
        if self.admin_token:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else (request.query.get("token") or [""])[0]
            if given and secrets.compare_digest(given.encode(), self.admin_token.encode()):
                return True, ""
            return False, "the dashboard needs the operator token: open /dashboard?token=<server.admin_token>\n"
        if request.peer_loopback:
            return True, ""
        return False, ("server.admin_token is not set, so the dashboard answers only loopback callers; "
                       "set an admin token to open it from elsewhere\n")


def _event_line(federation: Federation, view: FederationStatus) -> bytes:
    return b"data: " + json.dumps(dashboard.snapshot(federation, view)).encode() + b"\n\n"


def _is_loopback(peer: object) -> bool:
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.partition(" ")[0]
    path, _, query = target.partition("?")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return _Request(method=method, path=unquote(path), query=parse_qs(query), headers=headers,
                    peer_loopback=_is_loopback(writer.get_extra_info("peername")))


def _response(writer: asyncio.StreamWriter, status: str, body: bytes, ctype: str, *, head: bool = False) -> None:
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
        .encode("latin-1") + (b"" if head else body)
    )


async def _handle(routes: _Routes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await _read_request(reader, writer)
        if request is None:
            return
        head = request.method == "HEAD"
        text = "text/plain; charset=utf-8"
        path = request.path.rstrip("/") or "/"
        if request.method not in ("GET", "HEAD"):
            _response(writer, "405 Method Not Allowed", b"only GET\n", text)
        elif path == "/metrics":
            try:
                # In a thread: the collectors read the store and walk the data directory
                # (rankfed_storage_bytes), which the event loop must not wait for.
                rendered = await asyncio.to_thread(routes.metrics.render)
                _response(writer, "200 OK", rendered.encode(), CONTENT_TYPE, head=head)
            except Exception:  # noqa: BLE001 - a scrape must never take the coordinator down
                log.exception("metrics rendering failed")
                _response(writer, "500 Internal Server Error", b"see the coordinator log\n", text)
        elif path in ("/", "/healthz"):
            _response(writer, "200 OK", b"ok: metrics at /metrics, dashboard at /dashboard\n", text, head=head)
        elif path.startswith("/dashboard/") and path.removeprefix("/dashboard/") in dashboard.STATIC_FILES:
            name = path.removeprefix("/dashboard/")
            _response(writer, "200 OK", dashboard.static_file(name), dashboard.STATIC_FILES[name], head=head)
        elif path in ("/dashboard", "/dashboard/state", "/dashboard/events"):
            allowed, why = routes.authorized(request)
            if not allowed:
                _response(writer, "403 Forbidden", why.encode(), text)
            elif routes.federation is None:
                _response(writer, "404 Not Found", b"no federation on this listener\n", text)
            elif path == "/dashboard":
                _response(writer, "200 OK", dashboard.static_file("index.html"), dashboard.STATIC_FILES["index.html"],
                          head=head)
            elif path == "/dashboard/state":
                fed = routes.federation
                body = await asyncio.to_thread(lambda: json.dumps(dashboard.snapshot(fed, fed.status())).encode())
                _response(writer, "200 OK", body, "application/json", head=head)
            else:
                await _event_stream(routes, routes.federation, reader, writer)
        else:
            _response(writer, "404 Not Found", b"not found: try /metrics or /dashboard\n", text)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _event_stream(routes: _Routes, federation: Federation, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    """Server-Sent Events: one `data:` line of dashboard state per status change (the
    federation's own watch stream, coalesced there), then `event: done` at the end."""
    if routes.streams >= _MAX_EVENT_STREAMS:
        _response(writer, "503 Service Unavailable", b"too many open dashboards\n", "text/plain; charset=utf-8")
        return
    routes.streams += 1
    views = federation.watch()
    peer_gone = asyncio.ensure_future(reader.read(1))  # EOF (or stray bytes) ends the stream
    pending: asyncio.Future[FederationStatus] | None = None
    try:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                     b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n")
        await writer.drain()
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(views))
            waiting: set[asyncio.Future[FederationStatus] | asyncio.Future[bytes]] = {pending, peer_gone}
            done, _ = await asyncio.wait(waiting, timeout=_KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            if peer_gone in done:
                return
            if pending not in done:
                writer.write(b": keepalive\n\n")
            else:
                try:
                    view = pending.result()
                except StopAsyncIteration:
                    writer.write(b"event: done\ndata: {}\n\n")
                    await writer.drain()
                    return
                pending = None
                writer.write(await routes.event(federation, view))
            await writer.drain()
    finally:
        routes.streams -= 1
        for fut in (pending, peer_gone):
            if fut is not None:
                fut.cancel()
        with contextlib.suppress(Exception):
            await views.aclose()


async def start_http_listener(metrics: CoordinatorMetrics, address: str, *, federation: Federation | None = None,
                              admin_token: str = "") -> HttpListener:
    """Serve /metrics (and, given a federation, the dashboard) on host:port (port 0: any free port)."""
    routes = _Routes(metrics, federation, admin_token)
    listener: HttpListener | None = None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert listener is not None and task is not None
        listener._handlers.add(task)
        try:
            await _handle(routes, reader, writer)
        finally:
            listener._handlers.discard(task)

    host, _, port = address.rpartition(":")
    server = await asyncio.start_server(on_connect, host.strip("[]") or None, int(port), limit=_MAX_REQUEST_BYTES)
    listener = HttpListener(server=server, port=server.sockets[0].getsockname()[1])
    return listener
