"""Prometheus metrics for the coordinator, with prometheus_client (text exposition 0.0.4).

Each coordinator has its own CollectorRegistry (tests run several in one process). Counters
and histograms are updated by the servicers; gauges (round, phase, clients by state, disk
use) are read from the federation at scrape time by a custom collector, so they can never
go stale. The standard process (CPU, memory, open files) and Python (GC, version)
collectors are registered too.

    rankfed_rpcs_total{method,code}               RPCs by method and final status code
    rankfed_rpc_duration_seconds{method}          RPC latency (GetTask includes its long-poll)
    rankfed_get_task_overrun_seconds              GetTask WAIT answers: time past the long-poll's due moment
    rankfed_event_loop_lag_seconds                how late a 50 ms sleep on the event loop woke
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
    rankfed_storage_bytes{kind}                   bytes on disk: updates, global adapters, state db
    rankfed_updates_deleted_total                 accepted updates deleted by [storage] retention
    process_*, python_*                           prometheus_client's process and platform collectors

Served on `server.metrics_address` (plain HTTP, GET /metrics; rankfed/coordinator/http.py);
keep it on loopback or a private network: it reveals counts, never tokens, names or payloads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from rankfed.coordinator import errors

if TYPE_CHECKING:
    from rankfed.coordinator.federation import Federation
    from rankfed.coordinator.models import RoundRecord

log = logging.getLogger("rankfed.coordinator")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# The `_created` timestamps prometheus_client adds to every counter by default double the
# series count and no dashboard of ours uses them. Process-wide, and idempotent.
# prometheus_client leaves it unannotated (unused-ignore: only strict checking flags the call).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call, unused-ignore]


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
    """Every metric the coordinator exports; one instance (and registry) per coordinator."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        # prometheus_client appends `_total` to counter names itself.
        self.rpcs = Counter("rankfed_rpcs", "RPCs handled, by method and final status code.", ("method", "code"),
                            registry=reg)
        self.rpc_seconds = Histogram(
            "rankfed_rpc_duration_seconds", "RPC latency by method (GetTask includes its long-poll).",
            ("method",), buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.get_task_overrun = Histogram(
            "rankfed_get_task_overrun_seconds",
            "GetTask answered WAIT: how long after its long-poll was due (the coordinator's own delay).",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.loop_lag = Histogram(
            "rankfed_event_loop_lag_seconds",
            "How much later than asked a 50 ms sleep on the event loop woke: what every RPC waited then.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.upload_seconds = Histogram(
            "rankfed_upload_duration_seconds", "Accepted uploads: first message to receipt.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.upload_phase_seconds = Histogram(
            "rankfed_upload_phase_seconds",
            "Accepted uploads, time per phase: begin, receive, drain (writer catching up), verify, sync (the "
            "update's fsync), commit (lock, publish, receipt row), receipt_sync (answered at its end), fold "
            "(beside receipt_sync and after the answer).",
            ("phase",), buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.rejected = Counter(
            "rankfed_uploads_rejected", "Uploads refused, by status code and short reason.", ("code", "reason"),
            registry=reg,
        )
        self.bytes_in = Counter("rankfed_bytes_received", "Update bytes received in upload chunks.", registry=reg)
        self.bytes_out = Counter("rankfed_bytes_sent", "Adapter bytes sent in download chunks.", registry=reg)
        self.rounds = Counter("rankfed_rounds", "Rounds closed since the coordinator started.", ("outcome",),
                              registry=reg)
        self.aggregation_seconds = Histogram(
            "rankfed_aggregation_duration_seconds", "Time to aggregate a round and save its global adapter.",
            buckets=AGGREGATION_BUCKETS, registry=reg,
        )
        self.updates_deleted = Counter(
            "rankfed_updates_deleted", "Accepted update files deleted by [storage] retention.", registry=reg
        )
        prometheus_client.ProcessCollector(registry=reg)
        prometheus_client.PlatformCollector(registry=reg)
        prometheus_client.GCCollector(registry=reg)
        self._federation: Federation | None = None
        self._gauges: _FederationCollector | None = None

    def bind(self, federation: Federation, disk_usage: Callable[[], dict[str, int]] | None = None) -> None:
        """Read gauges from this federation at scrape time (and disk use from `disk_usage`)."""
        self._federation = federation
        if self._gauges is None:
            self._gauges = _FederationCollector(federation, disk_usage)
            self.registry.register(self._gauges)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when absent): for tests and the dashboard."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    # ---------------------------------------------------------------- events

    def rpc_done(self, method: str, code: str, seconds: float, exc: BaseException | None = None) -> None:
        self.rpcs.labels(method=method, code=code).inc()
        self.rpc_seconds.labels(method=method).observe(seconds)
        if method == "UploadUpdate":
            if code == "OK":
                self.upload_seconds.observe(seconds)
            else:
                self.rejected.labels(code=code, reason=_SAFE_LABEL.sub("_", reject_reason(exc))).inc()

    def upload_phase(self, phase: str, seconds: float) -> None:
        self.upload_phase_seconds.labels(phase=phase).observe(seconds)

    def round_closed(self, record: RoundRecord) -> None:
        self.rounds.labels(outcome=record.phase.value).inc()
        seconds = record.metrics.get("aggregation_seconds")
        if seconds is not None:
            self.aggregation_seconds.observe(float(seconds))

    # ---------------------------------------------------------------- exposition

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def _gauge(name: str, help: str, samples: Iterable[tuple[dict[str, str], float]], labels: tuple[str, ...] = ()
           ) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help, labels=labels)
    for label_values, value in samples:
        family.add_metric([label_values[k] for k in labels], value)
    return family


class _FederationCollector(Collector):
    """Gauges read from the federation at scrape time."""

    def __init__(self, federation: Federation, disk_usage: Callable[[], dict[str, int]] | None) -> None:
        self._fed = federation
        self._disk_usage = disk_usage

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: its families depend on the federation's state

    def collect(self) -> Iterable[Metric]:
        from rankfed.protocol import ParticipantState, RoundPhase

        # Counts only, straight from the state store: a scrape that built the round's
        # status and every client's record held the event loop 0.39 s at 10,000 clients
        # (LoopWatch caught it), every Prometheus interval.
        fed = self._fed
        store = fed.store
        latest = store.latest_round()
        round_no = latest.round if latest else 0
        phase = latest.phase if latest else None
        yield _gauge("rankfed_round", "Number of the current (or last) round; 0 before the first.", [({}, round_no)])
        yield _gauge("rankfed_rounds_planned", "Rounds configured (federation.rounds).",
                     [({}, fed.config.federation.rounds)])
        yield _gauge("rankfed_federation_done", "1 once the federation has finished its rounds.",
                     [({}, 1 if fed.done else 0)])
        yield _gauge("rankfed_round_phase", "1 for the phase the current round is in.",
                     [({"phase": p.value}, 1 if p is phase else 0) for p in RoundPhase], ("phase",))
        counts = dict.fromkeys(ParticipantState, 0)
        counts.update(store.count_participants(round_no) if latest else {})
        yield _gauge("rankfed_participants", "Participants of the current round by state.",
                     [({"state": s.value}, n) for s, n in counts.items()], ("state",))
        registered, left = store.count_clients()
        online = fed.clients_online()  # a device that leaves or is removed is no longer online
        yield _gauge("rankfed_clients", "Registered devices: online (seen within the heartbeat timeout), offline, left.",
                     [({"state": "online"}, online), ({"state": "left"}, left),
                      ({"state": "offline"}, max(0, registered - online - left))], ("state",))
        if self._disk_usage is not None:
            yield _gauge("rankfed_storage_bytes", "Bytes on disk in the data directory, by kind.",
                         [({"kind": k}, v) for k, v in self._disk_usage().items()], ("kind",))
