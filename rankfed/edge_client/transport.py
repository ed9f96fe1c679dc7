"""The stub layer: every RPC to the coordinator, with retries, backoff and streaming.

With `evaluator_transport` (the evaluator role's calls over the same `Connection`), the
only edge modules that import grpc. It takes and returns the dataclasses of
`rankfed.protocol` and raises the `errors.TransportError` family, mapped from gRPC status
codes in one table (`STATUS_TO_ERROR`).

Retries: calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED are retried with capped
exponential backoff and full jitter until `RetryPolicy.max_elapsed_s` is spent. A retried
upload resumes: it asks UploadStatus how many of its bytes the coordinator kept from the
broken stream and sends the rest (UploadHeader.resume_offset); a coordinator without
UploadStatus (UNIMPLEMENTED), or `resume_uploads=False`, gets the whole file again. The
coordinator is idempotent on the digest: ALREADY_EXISTS for our own digest counts as
accepted. Downloads resume from the last byte received (DownloadRequest.offset); the
sha256 checks at the end cover the whole file either way. `last_upload` and
`last_download` say what a transfer cost (attempts, bytes, where it resumed).

A dead link is noticed by HTTP/2 keepalive pings (`keepalive_s`, then 10 s for the
answer), a cut one at once; the channel reconnects with a backoff capped at 10 s.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Self, TypeVar

import grpc

from rankfed.protocol import (
    DownloadRequest,
    ErrorReason,
    HeartbeatRequest,
    HeartbeatResult,
    JoinRequest,
    JoinResult,
    LeaveRequest,
    ParticipantState,
    Task,
    TransferManifest,
    UploadHeader,
    UploadReceipt,
    UploadStatusRequest,
    UploadStatusResult,
    serde,
)
from rankfed.tls import TlsError, TlsOptions, channel_for
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import edge_pb2_grpc as ProtoEdgeGrpc

from .credentials import DeviceKeys
from .errors import (
    AuthError,
    ConfigError,
    DuplicateError,
    IntegrityError,
    RejectedError,
    StaleRoundError,
    TransportError,
    UnavailableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 1 * MiB
# Every channel argument in one place: misspelled names are silently ignored by grpc.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 8 * MiB),
    ("grpc.max_send_message_length", 8 * MiB),
    # After a cut link, try to reconnect within 10 s (grpc's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 10_000),
    # Answer to a keepalive ping: without one in this long the connection is dead.
    ("grpc.keepalive_timeout_ms", 10_000),
)
# Ping an idle-looking connection this often (the coordinator accepts one per 10 s or more).
DEFAULT_KEEPALIVE_S = 30.0
# Refuse downloads larger than this before buffering them.
MAX_DOWNLOAD_BYTES = 1 << 30

STATUS_TO_ERROR: dict[grpc.StatusCode, type[TransportError]] = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.FAILED_PRECONDITION: StaleRoundError,
    grpc.StatusCode.ALREADY_EXISTS: DuplicateError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.INVALID_ARGUMENT: RejectedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RejectedError,
    grpc.StatusCode.NOT_FOUND: RejectedError,
}
RETRYABLE = (UnavailableError,)


def map_rpc_error(err: grpc.RpcError, what: str) -> TransportError:
    """The one place where a gRPC status becomes an edge exception."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
    detail = serde.error_detail_from_trailers(err.trailing_metadata()) if isinstance(err, grpc.Call) else None
    cls = STATUS_TO_ERROR.get(code, TransportError)
    return cls(f"{what}: {code.name}: {details}", code=code.name, detail=detail)


def held_is_ours(err: DuplicateError, header: UploadHeader) -> bool:
    """ALREADY_EXISTS names the update the coordinator holds: is it this very one (a retry
    whose first receipt was lost), or another (an error)? Compared by field, never by text."""
    detail = err.detail
    return (
        detail is not None
        and detail.reason == ErrorReason.UPDATE_ALREADY_ACCEPTED
        and detail.metadata.get("sha256") == header.sha256
    )


@dataclass(frozen=True)
class RetryPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    multiplier: float = 2.0
    # Give up after this long of consecutive failures of one call.
    max_elapsed_s: float = 300.0

    def delays(self, rng: random.Random) -> Iterator[float]:
        """Full-jitter exponential backoff (AWS architecture blog, 'Exponential Backoff And Jitter')."""
        cap = self.initial_backoff_s
        while True:
            yield rng.uniform(0.0, cap)
            cap = min(cap * self.multiplier, self.max_backoff_s)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class TransferStats:
    """What one upload or download cost: calls made, payload bytes handed to (or taken
    from) gRPC over all of them (a cut stream loses some of what it was handed), and the
    offsets later calls resumed from."""

    total_bytes: int = 0
    attempts: int = 0
    payload_bytes: int = 0
    resumed_from: list[int] = field(default_factory=list)


def _kept_bytes(err: StaleRoundError) -> int | None:
    """What the coordinator holds of our upload when it refused a resume (None: another refusal)."""
    detail = err.detail
    if detail is None or detail.reason != ErrorReason.UPLOAD_NOT_RESUMABLE:
        return None
    try:
        return max(0, int(detail.metadata.get("resume_offset", "0")))
    except ValueError:
        return 0


class Connection:
    """A channel to one coordinator with the call machinery every client of it shares:
    retries with backoff (`with_retries`) and resumable, verified downloads (`receive`).

    ``tls``: None for plaintext (the coordinator allows it on loopback only, or with
    --insecure), else TLS verifying the server with ``ca_file`` (None: system roots) and,
    for mutual TLS, presenting ``cert_file``/``key_file``.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: TlsOptions | None = None,
        retry: RetryPolicy = RetryPolicy(),
        call_timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
    ) -> None:
        self.address = address
        self.retry = retry
        self.call_timeout_s = call_timeout_s
        self._sleep = sleep
        self._rng = random.Random(seed)
        options = (*CHANNEL_OPTIONS, ("grpc.keepalive_time_ms", int(keepalive_s * 1000)))
        try:
            self._channel = channel_for(address, tls, options)
        except (TlsError, OSError) as err:
            raise ConfigError(f"TLS settings: {err}") from err
        # Measured on the real link by the last download, bytes per second (0: none yet).
        self.download_bytes_per_second = 0.0
        self.last_download = TransferStats()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_retries(self, what: str, call: Callable[[int], T]) -> T:
        """Run ``call(attempt)``, retrying retryable failures with backoff."""
        start = time.monotonic()
        delays = self.retry.delays(self._rng)
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(attempt)
            except grpc.RpcError as err:
                exc = map_rpc_error(err, what)
            except RETRYABLE as err:
                exc = err
            if not isinstance(exc, RETRYABLE):
                raise exc
            delay = next(delays)
            if time.monotonic() - start + delay > self.retry.max_elapsed_s:
                raise exc
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc)
            self._sleep(delay)

    def receive(
        self,
        what: str,
        open_stream: Callable[[int], Iterable[ProtoEdge.DownloadMessage]],
        *,
        expected_sha256: str = "",
        progress: ProgressFn | None = None,
    ) -> tuple[TransferManifest, bytes]:
        """A file streamed as a TransferManifest then chunks (``open_stream(offset)`` opens
        the stream from a byte): resumes after a broken stream and checks size and sha256
        against the manifest (and ``expected_sha256`` when given)."""
        buf = bytearray()
        state: dict[str, TransferManifest] = {}
        started = time.monotonic()
        stats = self.last_download = TransferStats()

        def call(attempt: int) -> TransferManifest:
            stats.attempts += 1
            if buf:
                stats.resumed_from.append(len(buf))
                log.info("%s: resuming at byte %d", what, len(buf))
            manifest: TransferManifest | None = None
            for message in open_stream(len(buf)):
                kind = message.WhichOneof("kind")
                if kind == "manifest":
                    manifest = serde.transfer_manifest_from_proto(message.manifest)
                    previous = state.get("manifest")
                    if previous is not None and previous.sha256 != manifest.sha256:
                        log.warning("the file changed during a resumed %s; restarting", what)
                        buf.clear()
                    if manifest.total_bytes > MAX_DOWNLOAD_BYTES:
                        raise IntegrityError(
                            f"download of {manifest.total_bytes} bytes exceeds the "
                            f"{MAX_DOWNLOAD_BYTES}-byte cap"
                        )
                    state["manifest"] = manifest
                    stats.total_bytes = manifest.total_bytes
                elif kind == "chunk":
                    if manifest is None:
                        raise IntegrityError(f"{what}: a chunk arrived before the manifest")
                    chunk = message.chunk
                    if chunk.offset != len(buf):
                        raise IntegrityError(f"{what}: chunk at offset {chunk.offset}, expected {len(buf)}")
                    if len(buf) + len(chunk.data) > manifest.total_bytes:
                        raise IntegrityError(f"{what}: more bytes than the manifest announced")
                    buf.extend(chunk.data)
                    stats.payload_bytes += len(chunk.data)
                    if progress is not None:
                        progress(len(buf), manifest.total_bytes)
            if manifest is None:
                raise IntegrityError(f"{what}: the stream ended without a manifest")
            if len(buf) != manifest.total_bytes:
                # A stream cut short without an error status: resume like UNAVAILABLE.
                raise UnavailableError(
                    f"{what}: stream ended at {len(buf)} of {manifest.total_bytes} bytes", code="UNAVAILABLE",
                )
            return manifest

        manifest = self.with_retries(what, call)
        data = bytes(buf)
        digest = sha256_hex(data)
        if digest != manifest.sha256:
            raise IntegrityError(f"{what}: sha256 {digest} does not match the manifest's {manifest.sha256}")
        if expected_sha256 and digest != expected_sha256:
            raise IntegrityError(f"{what}: got adapter {digest}, the task announced {expected_sha256}")
        elapsed = time.monotonic() - started
        if elapsed > 0 and data:
            self.download_bytes_per_second = len(data) / elapsed
        return manifest, data


class EdgeTransport(Connection):
    """A connection to one coordinator's EdgeService (sync API: fine for one device).

    ``tls``: as for `Connection`; under mutual TLS the certificate's CN enrolls the device.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: TlsOptions | None = None,
        retry: RetryPolicy = RetryPolicy(),
        call_timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
        keys: DeviceKeys | None = None,
        resume_uploads: bool = True,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
    ) -> None:
        super().__init__(address, tls=tls, retry=retry, call_timeout_s=call_timeout_s, sleep=sleep, seed=seed,
                         keepalive_s=keepalive_s)
        # False: a broken upload is sent again whole (what clients did before UploadStatus).
        self.resume_uploads = resume_uploads
        # The device key proves this device's name at later joins (in memory by default;
        # `rankfed edge run` keeps it in a file so a restarted device can rejoin).
        self.keys = keys if keys is not None else DeviceKeys()
        self._stub = ProtoEdgeGrpc.EdgeServiceStub(self._channel)
        self._token = ""
        self.max_chunk_bytes = DEFAULT_CHUNK_BYTES
        # Measured on the real link by the last upload, bytes per second (0: none yet).
        self.upload_bytes_per_second = 0.0
        self.last_upload = TransferStats()

    # -- plumbing ----------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    # -- calls -------------------------------------------------------------------------

    def join(self, request: JoinRequest) -> JoinResult:
        name = request.device_name.strip()
        if not request.device_key:
            request = replace(request, device_key=self.keys.get(self.address, name))
        proto = serde.join_request_to_proto(request)

        def call(_: int) -> JoinResult:
            response = self._stub.Join(proto, timeout=self.call_timeout_s)
            return serde.join_result_from_proto(response)

        result = self.with_retries("Join", call)
        if result.device_key:
            self.keys.put(self.address, name, result.device_key)
        self._token = result.session_token
        if result.max_chunk_bytes:
            self.max_chunk_bytes = min(result.max_chunk_bytes, 4 * MiB)
        return result

    def get_task(self, max_wait_s: float) -> Task | None:
        proto = serde.get_task_request_to_proto(max_wait_s)

        def call(_: int) -> Task | None:
            response = self._stub.GetTask(
                proto, timeout=max_wait_s + self.call_timeout_s, metadata=self._metadata()
            )
            return serde.task_from_proto(response)

        return self.with_retries("GetTask", call)

    def heartbeat(self, round: int, state: ParticipantState, progress: float) -> HeartbeatResult:
        """One attempt, no retries: the next heartbeat is the retry."""
        proto = serde.heartbeat_request_to_proto(HeartbeatRequest(round=round, state=state, progress=progress))
        try:
            response = self._stub.Heartbeat(proto, timeout=10.0, metadata=self._metadata())
        except grpc.RpcError as err:
            raise map_rpc_error(err, "Heartbeat") from None
        return serde.heartbeat_result_from_proto(response)

    @property
    def joined(self) -> bool:
        """Whether this transport holds a session (joined and not left)."""
        return bool(self._token)

    def leave(self, reason: str) -> None:
        try:
            self._stub.Leave(
                serde.leave_request_to_proto(LeaveRequest(reason=reason)), timeout=10.0, metadata=self._metadata()
            )
        except grpc.RpcError as err:
            raise map_rpc_error(err, "Leave") from None
        self._token = ""  # the coordinator revoked it

    def download(
        self,
        round: int,
        *,
        expected_sha256: str = "",
        progress: ProgressFn | None = None,
        full: bool = False,
    ) -> tuple[TransferManifest, bytes]:
        """Fetch the global adapter for ``round``: resumes after a broken stream and checks
        size and sha256 against the manifest (and ``expected_sha256`` when given). With
        ``full`` (round 0 only), the latest global adapter at the global rank, to export."""

        def open_stream(offset: int) -> Iterable[ProtoEdge.DownloadMessage]:
            return self._stub.DownloadAdapter(
                serde.download_request_to_proto(DownloadRequest(round=round, offset=offset, full=full)),
                timeout=self.call_timeout_s * 10,
                metadata=self._metadata(),
            )

        return self.receive("DownloadAdapter", open_stream, expected_sha256=expected_sha256, progress=progress)

    def upload_status(self, request: UploadStatusRequest) -> UploadStatusResult:
        """How many bytes of this upload the coordinator kept from a broken stream (one
        attempt, no retries: `upload` calls it inside its own)."""
        try:
            response = self._stub.UploadStatus(
                serde.upload_status_request_to_proto(request), timeout=self.call_timeout_s, metadata=self._metadata()
            )
        except grpc.RpcError as err:
            raise map_rpc_error(err, "UploadStatus") from None
        return serde.upload_status_result_from_proto(response)

    def upload(
        self,
        header: UploadHeader,
        blob: bytes,
        *,
        progress: ProgressFn | None = None,
    ) -> UploadReceipt:
        """Stream ``blob`` (header first, then chunks with offsets). A broken stream is
        resumed from the bytes the coordinator kept (or re-sent whole, see the module doc);
        ALREADY_EXISTS for our own digest on a retry counts as accepted."""
        if header.total_bytes != len(blob) or header.sha256 != sha256_hex(blob):
            raise ValueError("upload header does not describe the blob (size or sha256)")
        stats = self.last_upload = TransferStats(total_bytes=len(blob))

        def call(attempt: int) -> UploadReceipt:
            stats.attempts += 1
            try:
                start = self._kept(header) if attempt > 1 and self.resume_uploads else 0
                while True:
                    try:
                        return self._send(replace(header, resume_offset=start), blob, stats, progress)
                    except StaleRoundError as err:
                        # The kept bytes went between UploadStatus and now (expired, or the
                        # round's staging was dropped): go on from what is there, at most once more.
                        kept = _kept_bytes(err)
                        if kept is None or kept >= start:
                            raise
                        log.warning("UploadUpdate: resume at byte %d refused, %d kept: %s", start, kept, err)
                        start = kept
            except DuplicateError as exc:
                if not held_is_ours(exc, header):
                    raise
                log.info("update for round %d was already accepted", header.round)
                return UploadReceipt(
                    round=header.round,
                    bytes_received=len(blob),
                    sha256=header.sha256,
                    receipt_id=exc.detail.metadata.get("receipt_id", "") if exc.detail else "",
                    duplicate=True,
                )

        return self.with_retries("UploadUpdate", call)

    def _kept(self, header: UploadHeader) -> int:
        """The byte to resume a broken upload from: what the coordinator kept of it."""
        request = UploadStatusRequest(round=header.round, total_bytes=header.total_bytes, sha256=header.sha256)
        try:
            kept = self.upload_status(request).resume_offset
        except TransportError as exc:
            if exc.code != "UNIMPLEMENTED":
                raise
            log.info("the coordinator cannot resume uploads (no UploadStatus): sending the whole update")
            self.resume_uploads = False
            return 0
        if not 0 <= kept <= header.total_bytes:
            raise IntegrityError(f"UploadStatus: resume_offset {kept} is past the {header.total_bytes}-byte update")
        if kept:
            log.info("UploadUpdate: resuming at byte %d of %d", kept, header.total_bytes)
        return kept

    def _send(self, header: UploadHeader, blob: bytes, stats: TransferStats,
              progress: ProgressFn | None) -> UploadReceipt:
        """One UploadUpdate call: the header, then the chunks from `header.resume_offset`."""
        chunk_bytes, start = self.max_chunk_bytes, header.resume_offset
        if start:
            stats.resumed_from.append(start)

        def messages() -> Iterator[ProtoEdge.UploadMessage]:
            yield ProtoEdge.UploadMessage(header=serde.upload_header_to_proto(header))
            for offset in range(start, len(blob), chunk_bytes):
                data = blob[offset : offset + chunk_bytes]
                stats.payload_bytes += len(data)
                yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data))
                if progress is not None:
                    progress(offset + len(data), len(blob))

        started = time.monotonic()
        try:
            response = self._stub.UploadUpdate(messages(), timeout=self.call_timeout_s * 10, metadata=self._metadata())
        except grpc.RpcError as err:
            raise map_rpc_error(err, "UploadUpdate") from None
        elapsed = time.monotonic() - started
        if elapsed > 0 and len(blob) > start:
            self.upload_bytes_per_second = (len(blob) - start) / elapsed
        receipt = serde.upload_receipt_from_proto(response)
        if receipt.sha256 and receipt.sha256 != header.sha256:
            raise IntegrityError(
                f"UploadUpdate: the receipt names digest {receipt.sha256}, we sent {header.sha256}"
            )
        return receipt
