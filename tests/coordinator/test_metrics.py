"""The Prometheus endpoint: a round over real gRPC shows up in every metric family, the
exposition is well-formed, and junk HTTP requests do not hurt the coordinator."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request

import grpc
import pytest

from rankfed.coordinator import errors
from rankfed.coordinator.metrics import CoordinatorMetrics, reject_reason
from tests.coordinator.harness import random_adapter, status, wait_for

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+-]+|\+Inf)$')
# Our families, and the standard ones prometheus_client's process and platform collectors add.
PREFIXES = ("rankfed_", "process_", "python_")


LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def _canonical(series: str) -> str:
    """`name{b="1",a="2"}` -> `name{a="2",b="1"}`: label order is not part of a series' identity."""
    name, brace, rest = series.partition("{")
    if not brace:
        return series
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(LABEL.findall(rest))) + "}"


class Samples(dict):
    """Scraped samples, looked up by series whatever the label order."""

    def __getitem__(self, series: str) -> float:
        return super().__getitem__(_canonical(series))

    def get(self, series: str, default=None):
        return super().get(_canonical(series), default)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = Samples()
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(tuple(f"# {kind} {p}" for kind in ("HELP", "TYPE") for p in PREFIXES)), line
            continue
        assert SAMPLE.match(line), line
        name, _, value = line.rpartition(" ")
        samples[_canonical(name)] = float(value)
    return samples


def test_a_round_shows_up_in_the_metrics(start, clients, tiny_manifest):
    server = start(**{
        "server.metrics_address": "127.0.0.1:0", "federation.rounds": 1, "federation.min_clients": 2,
        "federation.straggler_grace_seconds": 0.0,
    })
    port = server.coordinator.metrics_port
    assert port
    before = scrape(port)
    assert before['rankfed_round_phase{phase="waiting_for_clients"}'] == 1
    assert before['rankfed_clients{state="online"}'] == 0

    a, b = clients(server.address, "a", "b")
    tasks = [c.wait_train() for c in (a, b)]
    for c, t in zip((a, b), tasks):
        c.download(t.round)
    mid = scrape(port)
    assert mid["rankfed_round"] == 1 and mid['rankfed_round_phase{phase="training"}'] == 1
    assert mid['rankfed_participants{state="training"}'] == 2
    assert mid['rankfed_clients{state="online"}'] == 2
    assert mid["rankfed_bytes_sent_total"] > 0

    update = random_adapter(tiny_manifest, tasks[0].assignment.lora.rank, tasks[0].assignment.lora.alpha, 0)
    with pytest.raises(grpc.RpcError):
        a.upload(tasks[0].round, update, sha256="0" * 64)
    for i, (c, t) in enumerate(zip((a, b), tasks)):
        c.upload(t.round, random_adapter(tiny_manifest, t.assignment.lora.rank, t.assignment.lora.alpha, i))
    wait_for(lambda: status(server.address).done, what="federation done")
    # Counters are updated just after the status is sent: wait until the last one is in.
    wait_for(lambda: scrape(port).get('rankfed_rpcs_total{method="UploadUpdate",code="OK"}') == 2,
             what="uploads counted", timeout=5)
    after = scrape(port)
    assert after['rankfed_rpcs_total{method="Join",code="OK"}'] == 2
    assert after['rankfed_rpcs_total{method="UploadUpdate",code="OK"}'] == 2
    assert after['rankfed_rpcs_total{method="UploadUpdate",code="INVALID_ARGUMENT"}'] == 1
    assert after['rankfed_uploads_rejected_total{code="INVALID_ARGUMENT",reason="digest_mismatch"}'] == 1
    assert after["rankfed_upload_duration_seconds_count"] == 2
    # Every accepted upload went through each phase once; the rejected one counts in none.
    for phase in ("begin", "receive", "drain", "verify", "sync", "commit", "receipt_sync", "fold"):
        assert after[f'rankfed_upload_phase_seconds_count{{phase="{phase}"}}'] == 2, phase
    assert after['rankfed_rpc_duration_seconds_count{method="DownloadAdapter"}'] == 2
    assert after["rankfed_bytes_received_total"] > 0
    assert after['rankfed_rounds_total{outcome="done"}'] == 1
    assert after["rankfed_aggregation_duration_seconds_count"] == 1
    assert after['rankfed_aggregation_duration_seconds_bucket{le="+Inf"}'] == 1
    assert after['rankfed_round_phase{phase="done"}'] == 1 and after["rankfed_federation_done"] == 1
    assert after['rankfed_participants{state="uploaded"}'] == 2
    assert after["rankfed_event_loop_lag_seconds_count"] > 0  # the loop's own beat

    # A scrape reads counts: with 10,000 clients, building every record held the loop 0.39 s.
    def no_records(*_args, **_kwargs):
        raise AssertionError("a scrape must not build a record per client or participant")

    store = server.coordinator.federation.store
    store.list_clients = no_records
    store.list_participants = no_records
    counted = scrape(port)
    assert counted['rankfed_participants{state="uploaded"}'] == 2 and counted['rankfed_clients{state="left"}'] == 0
    assert counted['rankfed_clients{state="online"}'] + counted['rankfed_clients{state="offline"}'] == 2


def test_metrics_endpoint_shrugs_off_junk(start):
    server = start(**{"server.metrics_address": "127.0.0.1:0"})
    port = server.coordinator.metrics_port
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert info.value.code == 404
    info.value.close()
    for junk in (b"\x00\xff" * 5000, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000, b"POST /metrics HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1024)
            except ConnectionError:
                pass
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert "rankfed_round 1.0" in reply.read().decode()
    assert status(server.address).federation_id


def test_metrics_are_off_by_default(start):
    assert start().coordinator.metrics_port == 0


def test_exposition_escapes_labels_and_counts_buckets():
    metrics = CoordinatorMetrics()
    metrics.rpc_done('Odd"Method\\', "OK", 0.05)
    for seconds in (0.1, 0.5, 5.0):
        metrics.rpc_done("GetTask", "OK", seconds)
    lines = metrics.render().splitlines()
    assert 'rankfed_rpcs_total{code="OK",method="Odd\\"Method\\\\"} 1.0' in lines
    assert 'rankfed_rpc_duration_seconds_bucket{le="0.1",method="GetTask"} 1.0' in lines
    assert 'rankfed_rpc_duration_seconds_bucket{le="1.0",method="GetTask"} 2.0' in lines
    assert 'rankfed_rpc_duration_seconds_bucket{le="+Inf",method="GetTask"} 3.0' in lines
    assert 'rankfed_rpc_duration_seconds_count{method="GetTask"} 3.0' in lines
    assert 'rankfed_rpc_duration_seconds_sum{method="GetTask"} 5.6' in lines
    assert metrics.sample("rankfed_rpcs_total", method="GetTask", code="OK") == 3
    # process metrics come with prometheus_client, named per its conventions
    assert metrics.sample("process_resident_memory_bytes") > 0
    assert metrics.sample("process_cpu_seconds_total") > 0


@pytest.mark.parametrize(("exc", "reason"), [
    (errors.InvalidArgumentError("sha256 of the received bytes is x, header declared y"), "digest_mismatch"),
    (errors.InvalidArgumentError("upload ended after 3 of 9 declared bytes (truncated)"), "truncated"),
    (errors.PreconditionError("upload names stale round 1; the open round is 2"), "stale_round"),
    (errors.StorageError("disk full while writing"), "disk_full"),
    (errors.TooLargeError("too big"), "too_large"),
    (errors.DuplicateError("again"), "duplicate"),
    (ValueError("bug"), "internal"),
    (None, "cancelled"),
])
def test_reject_reasons(exc, reason):
    assert reject_reason(exc) == reason
