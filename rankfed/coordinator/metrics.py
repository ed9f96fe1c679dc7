"""Prometheus metrics for the coordinator, and the small HTTP endpoint that serves them.

The text exposition format (version 0.0.4) is simple enough to write by hand, so the core
install needs no prometheus-client: counters and histograms live here, gauges (round,
phase, clients by state) are read from the federation at scrape time.

    rankfed_rpcs_total{method,code}               RPCs by method and final status code
    rankfed_rpc_duration_seconds{method}          RPC latency (GetTask includes its long-poll)
    rankfed_upload_duration_seconds               header to receipt of accepted uploads
    rankfed_uploads_rejected_total{code,reason}   rejected uploads by status and short reason
    rankfed_bytes_received_total / _sent_total    update bytes in, adapter bytes out
    rankfed_rounds_total{outcome}                 rounds closed since start (done, failed)
    rankfed_aggregation_duration_seconds          time to aggregate and save a global adapter
    rankfed_round / rankfed_rounds_planned        current round number, configured rounds
    rankfed_round_phase{phase}                    1 for the current round's phase
    rankfed_participants{state}                   participants of the current round by state
    rankfed_clients{state}                        registered devices: online, offline, left
    rankfed_federation_done                       1 once the last round is closed

Served on `server.metrics_address` (plain HTTP, GET /metrics); keep it on loopback or a
private network: it reveals counts, never tokens, names or payloads.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from rankfed.coordinator import errors

if TYPE_CHECKING:
    from rankfed.coordinator.federation import Federation
    from rankfed.coordinator.models import RoundRecord

log = logging.getLogger("rankfed.coordinator")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple((k, str(labels[k])) for k in self.labelnames), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        if not self._values and not self.labelnames:
            yield f"{self.name} 0"
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(key)} {_num(value)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, list[float]] = {}  # per bucket counts..., then +Inf count, sum

    def observe(self, value: float, **labels: str) -> None:
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0] * (len(self.buckets) + 2)
        series[bisect.bisect_left(self.buckets, value)] += 1  # non-cumulative here
        series[-1] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(tuple((k, str(labels[k])) for k in self.labelnames))
        return 0 if series is None else int(sum(series[:-1]))

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key, series in sorted(self._series.items()):
            running = 0.0
            for bound, n in zip((*self.buckets, math.inf), series[:-1]):
                running += n
                yield f"{self.name}_bucket{_labels(key, (('le', _num(bound)),))} {_num(running)}"
            yield f"{self.name}_sum{_labels(key)} {_num(series[-1])}"
            yield f"{self.name}_count{_labels(key)} {_num(running)}"


def _gauge(name: str, help: str, samples: Iterable[tuple[Labels, float]]) -> Iterable[str]:
    yield f"# HELP {name} {help}"
    yield f"# TYPE {name} gauge"
    for key, value in samples:
        yield f"{name}{_labels(key)} {_num(value)}"


# --------------------------------------------------------------------------- rejection reasons

_PRECONDITION_REASONS = (
    ("stale round", "stale_round"),
    ("future round", "future_round"),
    ("before download", "not_downloaded"),
    ("already in progress", "concurrent_upload"),
    ("not selected", "not_participant"),
    ("no round is open", "no_open_round"),
)
_INVALID_REASONS = (
    ("sha256 of the received", "digest_mismatch"),
    ("truncated", "truncated"),
    ("offset", "out_of_order"),
    ("longer than", "too_long"),
    ("empty chunk", "empty_chunk"),
    ("finite", "non_finite"),
    ("must start with an uploadheader", "missing_header"),
    ("follow the upload header", "bad_stream"),
    ("header", "bad_header"),
    ("rank", "rank"),
    ("shape", "shape"),
    ("module", "modules"),
)


def reject_reason(exc: BaseException | None) -> str:
    """A short, bounded label for why an upload was refused (for rankfed_uploads_rejected_total)."""
    from rankfed.aggregation import AdapterError

    if exc is None or isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    reason = getattr(exc, "metrics_reason", None)
    if isinstance(reason, str):
        return reason
    text = str(exc).lower()
    simple = (
        (errors.AuthError, "unauthenticated"),
        (errors.PermissionDeniedError, "permission_denied"),
        (errors.DuplicateError, "duplicate"),
        (errors.TooLargeError, "too_large"),
        (errors.StorageError, "disk_full" if "full" in text or "no space" in text else "storage"),
    )
    for kind, label in simple:
        if isinstance(exc, kind):
            return label
    if isinstance(exc, errors.PreconditionError):
        return next((label for needle, label in _PRECONDITION_REASONS if needle in text), "precondition")
    if isinstance(exc, (errors.InvalidArgumentError, AdapterError)):
        return next((label for needle, label in _INVALID_REASONS if needle in text), "invalid_content")
    if isinstance(exc, errors.CoordinatorError):
        return type(exc).__name__.removesuffix("Error").lower() or "error"
    return "internal"


_SAFE_LABEL = re.compile(r"[^A-Za-z0-9_]")


class CoordinatorMetrics:
    """Every metric the coordinator exports; one instance per running coordinator."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.rpcs = Counter("rankfed_rpcs_total", "RPCs handled, by method and final status code.", ("method", "code"))
        self.rpc_seconds = Histogram(
            "rankfed_rpc_duration_seconds", "RPC latency by method (GetTask includes its long-poll).",
            LATENCY_BUCKETS, ("method",),
        )
        self.get_task_overrun = Histogram(
            "rankfed_get_task_overrun_seconds",
            "GetTask answered WAIT: how long after its long-poll was due (the coordinator's own delay).",
            LATENCY_BUCKETS,
        )
        self.upload_seconds = Histogram(
            "rankfed_upload_duration_seconds", "Accepted uploads: first message to receipt.", LATENCY_BUCKETS
        )
        self.rejected = Counter(
            "rankfed_uploads_rejected_total", "Uploads refused, by status code and short reason.", ("code", "reason")
        )
        self.bytes_in = Counter("rankfed_bytes_received_total", "Update bytes received in upload chunks.")
        self.bytes_out = Counter("rankfed_bytes_sent_total", "Adapter bytes sent in download chunks.")
        self.rounds = Counter("rankfed_rounds_total", "Rounds closed since the coordinator started.", ("outcome",))
        self.aggregation_seconds = Histogram(
            "rankfed_aggregation_duration_seconds", "Time to aggregate a round and save its global adapter.",
            AGGREGATION_BUCKETS,
        )
        self._federation: Federation | None = None

    def bind(self, federation: Federation) -> None:
        """Read gauges from this federation at scrape time, and count its closed rounds."""
        self._federation = federation
        federation.on_round_closed = self.round_closed

    # ---------------------------------------------------------------- events

    def rpc_done(self, method: str, code: str, seconds: float, exc: BaseException | None = None) -> None:
        self.rpcs.inc(method=method, code=code)
        self.rpc_seconds.observe(seconds, method=method)
        if method == "UploadUpdate":
            if code == "OK":
                self.upload_seconds.observe(seconds)
            else:
                self.rejected.inc(code=code, reason=_SAFE_LABEL.sub("_", reject_reason(exc)))

    def round_closed(self, record: RoundRecord) -> None:
        self.rounds.inc(outcome=record.phase.value)
        seconds = record.metrics.get("aggregation_seconds")
        if seconds is not None:
            self.aggregation_seconds.observe(float(seconds))

    # ---------------------------------------------------------------- exposition

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.rpcs, self.rpc_seconds, self.get_task_overrun, self.upload_seconds, self.rejected, self.bytes_in,
                       self.bytes_out, self.rounds, self.aggregation_seconds):
            lines.extend(metric.render())
        if self._federation is not None:
            lines.extend(self._gauges(self._federation))
        return "\n".join(lines) + "\n"

    def _gauges(self, fed: Federation) -> Iterable[str]:
        from rankfed.coordinator.models import ParticipantState, RoundPhase

        view = fed.status(history_limit=1)
        current = view.current
        round_no = current.record.round if current else 0
        phase = current.record.phase if current else None
        yield from _gauge("rankfed_round", "Number of the current (or last) round; 0 before the first.",
                          [((), round_no)])
        yield from _gauge("rankfed_rounds_planned", "Rounds configured (federation.rounds).", [((), view.total_rounds)])
        yield from _gauge("rankfed_federation_done", "1 once the federation has finished its rounds.",
                          [((), 1 if view.done else 0)])
        yield from _gauge("rankfed_round_phase", "1 for the phase the current round is in.",
                          [((("phase", p.value),), 1 if p is phase else 0) for p in RoundPhase])
        counts = dict.fromkeys(ParticipantState, 0)
        for part in current.participants if current else ():
            counts[part.participant.state] += 1
        yield from _gauge("rankfed_participants", "Participants of the current round by state.",
                          [((("state", s.value),), n) for s, n in counts.items()])
        clients = fed.list_clients()
        online = sum(1 for c, is_online in clients if is_online and not c.left)
        left = sum(1 for c, _ in clients if c.left)
        yield from _gauge("rankfed_clients", "Registered devices: online (seen within the heartbeat timeout), "
                          "offline, left.", [((("state", "online"),), online), ((("state", "left"),), left),
                                             ((("state", "offline"),), len(clients) - online - left)])


# --------------------------------------------------------------------------- HTTP endpoint

_MAX_REQUEST_BYTES = 8192
_REQUEST_TIMEOUT = 5.0


async def _handle(metrics: CoordinatorMetrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            return
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif path == "/metrics":
            try:
                status, body, ctype = "200 OK", metrics.render().encode(), CONTENT_TYPE
            except Exception:  # noqa: BLE001 - a scrape must never take the coordinator down
                log.exception("metrics rendering failed")
                status, body, ctype = "500 Internal Server Error", b"see the coordinator log\n", "text/plain"
        elif path in ("/", "/healthz"):
            status, body, ctype = "200 OK", b"ok: metrics at /metrics\n", "text/plain"
        else:
            status, body, ctype = "404 Not Found", b"not found: try /metrics\n", "text/plain"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode("latin-1") + (body if method != "HEAD" else b"")
        )
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def start_metrics_server(metrics: CoordinatorMetrics, address: str) -> tuple[asyncio.Server, int]:
    """Serve GET /metrics on host:port (port 0: any free port); returns the server and port."""
    host, _, port = address.rpartition(":")
    server = await asyncio.start_server(
        lambda r, w: _handle(metrics, r, w), host.strip("[]") or None, int(port), limit=_MAX_REQUEST_BYTES
    )
    bound = server.sockets[0].getsockname()[1]
    return server, bound
