"""EdgeTransport against an in-process fake EdgeService over real gRPC on 127.0.0.1:0."""

from __future__ import annotations

import hashlib
import threading
from concurrent import futures

import grpc
import pytest

from rankfed.edge_client.errors import (
    AuthError,
    DuplicateError,
    IntegrityError,
    RejectedError,
    StaleRoundError,
    UnavailableError,
)
from rankfed.edge_client.transport import EdgeTransport, RetryPolicy
from rankfed.protocol import (
    Capability,
    ErrorDetail,
    ErrorReason,
    JoinRequest,
    ParticipantState,
    TrainMetrics,
    TrainTask,
    UploadHeader,
    WaitTask,
    serde,
)
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import edge_pb2_grpc as ProtoEdgeGrpc

BLOB = bytes(range(256)) * 40  # 10 KiB
SHA = hashlib.sha256(BLOB).hexdigest()


class FakeEdge(ProtoEdgeGrpc.EdgeServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metadata: list[dict[str, str]] = []
        self.fail: dict[str, list[grpc.StatusCode]] = {}  # method -> codes to fail with, in order
        self.cut_download_after = 0  # chunks sent before a broken stream (first call only)
        self.download_offsets: list[int] = []
        self.uploads: list[list[ProtoEdge.UploadMessage]] = []
        self.cut_upload_after = 0
        self.blob = BLOB
        self.heartbeats: list[ProtoEdge.HeartbeatRequest] = []
        self.held_sha = SHA  # the digest ALREADY_EXISTS names: the update the coordinator holds

    def _enter(self, method: str, context) -> None:
        with self.lock:
            self.metadata.append(dict(context.invocation_metadata()))
            codes = self.fail.get(method)
            code = codes.pop(0) if codes else None
        if code is not None:
            context.abort(code, f"injected {code.name}")

    def Join(self, request, context):
        self._enter("Join", context)
        return ProtoEdge.JoinResponse(
            client_id="c-1", session_token="tok-1", max_chunk_bytes=4096,
            assignment=ProtoEdge.Assignment(lora=ProtoCommon.LoraConfig(rank=4, alpha=8.0, target_modules=["query"])),
            base_model=ProtoCommon.BaseModel(id="m", weights_sha256="ab" * 32, task="sequence-classification", num_labels=3),
        )

    def GetTask(self, request, context):
        self._enter("GetTask", context)
        if request.max_wait.seconds == 0:
            return ProtoEdge.Task(wait=ProtoEdge.WaitTask(reason="nothing yet"))
        return ProtoEdge.Task(train=ProtoEdge.TrainTask(round=3, local_steps=5, learning_rate=0.01, batch_size=8, adapter_sha256=SHA))

    def DownloadAdapter(self, request, context):
        self._enter("DownloadAdapter", context)
        self.download_offsets.append(request.offset)
        yield ProtoEdge.DownloadMessage(manifest=ProtoEdge.TransferManifest(
            round=request.round, rank=4, total_bytes=len(BLOB), sha256=SHA, chunk_bytes=1000))
        for i, offset in enumerate(range(request.offset, len(self.blob), 1000)):
            if self.cut_download_after and i == self.cut_download_after and len(self.download_offsets) == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            yield ProtoEdge.DownloadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=self.blob[offset:offset + 1000]))

    def UploadUpdate(self, request_iterator, context):
        self._enter("UploadUpdate", context)
        messages = []
        for i, message in enumerate(request_iterator):
            messages.append(message)
            if self.cut_upload_after and i == self.cut_upload_after and not self.uploads:
                self.uploads.append(messages)
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        self.uploads.append(messages)
        if len(self.uploads) > 1 and self.cut_upload_after:
            message = "an update for round 3 was already accepted"
            detail = ErrorDetail(ErrorReason.UPDATE_ALREADY_ACCEPTED, {"round": "3", "sha256": self.held_sha,
                                                                      "receipt_id": "r-held"})
            context.set_trailing_metadata((serde.error_detail_to_trailer(6, message, detail),))
            context.abort(grpc.StatusCode.ALREADY_EXISTS, message)
        data = b"".join(m.chunk.data for m in messages[1:])
        return ProtoEdge.UploadReceipt(round=messages[0].header.round, bytes_received=len(data),
                                       sha256=hashlib.sha256(data).hexdigest(), receipt_id="r-1")

    def Heartbeat(self, request, context):
        self._enter("Heartbeat", context)
        self.heartbeats.append(request)
        return ProtoEdge.HeartbeatResponse(round_open=request.round != 99)

    def Leave(self, request, context):
        self._enter("Leave", context)
        return ProtoEdge.LeaveResponse()


@pytest.fixture()
def server():
    fake = FakeEdge()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ProtoEdgeGrpc.add_EdgeServiceServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield fake, f"127.0.0.1:{port}"
    srv.stop(None)


@pytest.fixture()
def transport(server):
    sleeps: list[float] = []
    t = EdgeTransport(server[1], retry=RetryPolicy(max_elapsed_s=30), sleep=sleeps.append, seed=0)
    t.sleeps = sleeps
    yield t
    t.close()


def _join(t):
    return t.join(JoinRequest(device_name="d", capability=Capability(cpu_cores=2), base_model_sha256="ab" * 32, num_examples=10))


def test_join_then_calls_carry_the_token(server, transport):
    fake, _ = server
    result = _join(transport)
    assert result.client_id == "c-1" and result.assignment.lora.rank == 4 and result.base_model.num_labels == 3
    assert transport.max_chunk_bytes == 4096
    task = transport.get_task(1.0)
    assert isinstance(task, TrainTask) and task.round == 3 and task.adapter_sha256 == SHA
    assert isinstance(transport.get_task(0.0), WaitTask)
    assert "authorization" not in fake.metadata[0]
    assert fake.metadata[1]["authorization"] == "Bearer tok-1"


def test_unavailable_is_retried_with_backoff(server, transport):
    fake, _ = server
    fake.fail["Join"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    assert _join(transport).client_id == "c-1"
    assert len(transport.sleeps) == 2 and all(s >= 0 for s in transport.sleeps)


def test_retries_give_up_after_max_elapsed(server):
    fake, address = server
    fake.fail["Join"] = [grpc.StatusCode.UNAVAILABLE] * 100
    t = EdgeTransport(address, retry=RetryPolicy(initial_backoff_s=10, max_elapsed_s=1), sleep=lambda s: None)
    with pytest.raises(UnavailableError, match="UNAVAILABLE"):
        _join(t)
    t.close()


@pytest.mark.parametrize(
    "code, error",
    [(grpc.StatusCode.PERMISSION_DENIED, AuthError), (grpc.StatusCode.FAILED_PRECONDITION, StaleRoundError),
     (grpc.StatusCode.INVALID_ARGUMENT, RejectedError)],
)
def test_status_codes_map_to_errors_without_retry(server, transport, code, error):
    fake, _ = server
    fake.fail["Join"] = [code]
    with pytest.raises(error):
        _join(transport)
    assert transport.sleeps == []


def test_download_resumes_after_a_broken_stream(server, transport):
    fake, _ = server
    fake.cut_download_after = 3
    _join(transport)
    seen = []
    manifest, data = transport.download(3, expected_sha256=SHA, progress=lambda d, t: seen.append((d, t)))
    assert data == BLOB and manifest.rank == 4
    assert fake.download_offsets == [0, 3000]
    assert seen[-1] == (len(BLOB), len(BLOB))
    assert transport.download_bytes_per_second > 0


def test_download_checks_the_digest(server, transport):
    fake, _ = server
    fake.blob = BLOB[:-1] + b"\x00"
    _join(transport)
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        transport.download(3)


def test_upload_streams_header_then_bounded_chunks(server, transport):
    fake, _ = server
    _join(transport)
    header = UploadHeader(round=3, rank=4, num_examples=10, total_bytes=len(BLOB), sha256=SHA,
                          metrics=TrainMetrics(loss_first=1.0, loss_last=0.5, steps=5))
    receipt = transport.upload(header, BLOB)
    assert receipt.sha256 == SHA and receipt.bytes_received == len(BLOB) and not receipt.duplicate
    messages = fake.uploads[0]
    assert messages[0].WhichOneof("kind") == "header" and messages[0].header.metrics.steps == 5
    chunks = [m.chunk for m in messages[1:]]
    assert all(len(c.data) <= 4096 for c in chunks)
    assert [c.offset for c in chunks] == list(range(0, len(BLOB), 4096))
    assert transport.upload_bytes_per_second > 0


def test_broken_upload_is_resent_and_already_exists_counts_as_accepted(server, transport):
    fake, _ = server
    fake.cut_upload_after = 1
    _join(transport)
    header = UploadHeader(round=3, rank=4, num_examples=10, total_bytes=len(BLOB), sha256=SHA)
    receipt = transport.upload(header, BLOB)
    assert receipt.duplicate and receipt.sha256 == SHA and receipt.receipt_id == "r-held"
    assert len(fake.uploads) == 2 and fake.uploads[1][0].header.sha256 == SHA
    # This fake has no UploadStatus (UNIMPLEMENTED, an older coordinator): the retry sent it all.
    assert fake.uploads[1][0].header.resume_offset == 0 and not transport.resume_uploads
    assert transport.last_upload.attempts == 2 and transport.last_upload.resumed_from == []


def test_a_retry_that_meets_another_held_update_is_an_error(server, transport):
    """ALREADY_EXISTS for a digest that is not ours means another update counted: never 'accepted'."""
    fake, _ = server
    fake.cut_upload_after = 1
    fake.held_sha = "f" * 64
    _join(transport)
    header = UploadHeader(round=3, rank=4, num_examples=10, total_bytes=len(BLOB), sha256=SHA)
    with pytest.raises(DuplicateError) as err:
        transport.upload(header, BLOB)
    assert err.value.detail is not None and err.value.detail.metadata["sha256"] == "f" * 64


def test_upload_header_must_describe_the_blob(transport):
    with pytest.raises(ValueError):
        transport.upload(UploadHeader(round=1, rank=1, num_examples=1, total_bytes=1, sha256="x"), b"ab")


def test_heartbeat_reports_round_state(server, transport):
    fake, _ = server
    _join(transport)
    assert transport.heartbeat(3, ParticipantState.TRAINING, 0.5).round_open
    assert not transport.heartbeat(99, ParticipantState.TRAINING, 0.5).round_open
    assert fake.heartbeats[0].state == ProtoCommon.PARTICIPANT_STATE_TRAINING
    assert fake.heartbeats[0].progress == 0.5
    transport.leave("bye")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("pki")
    script = Path(__file__).resolve().parents[2] / "deploy" / "make-certs.sh"
    subprocess.run(["bash", str(script), str(out), "--device", "edge-1"], check=True, capture_output=True, timeout=60)
    return out


def test_mutual_tls(pki):
    from rankfed.tls import TlsOptions, server_credentials

    fake = FakeEdge()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ProtoEdgeGrpc.add_EdgeServiceServicer_to_server(fake, srv)
    port = srv.add_secure_port("127.0.0.1:0", server_credentials(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    srv.start()
    try:
        tls = TlsOptions(ca_file=pki / "ca.pem", cert_file=pki / "edge-1.pem", key_file=pki / "edge-1.key")
        with EdgeTransport(f"localhost:{port}", tls=tls) as t:
            assert _join(t).client_id == "c-1"
        fast = RetryPolicy(initial_backoff_s=0.01, max_elapsed_s=0.5)
        with EdgeTransport(f"localhost:{port}", retry=fast) as plain, pytest.raises(UnavailableError):
            _join(plain)
    finally:
        srv.stop(None)


def test_unreadable_tls_file_is_a_config_error(tmp_path):
    from rankfed.edge_client.errors import ConfigError
    from rankfed.tls import TlsOptions

    with pytest.raises(ConfigError, match="TLS settings"):
        EdgeTransport("localhost:1", tls=TlsOptions(ca_file=tmp_path / "missing.pem"))
