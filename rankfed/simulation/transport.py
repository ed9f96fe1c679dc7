"""An in-process `Transport` for `rankfed.edge_client.runner.EdgeRunner`: each call goes
through the same conversions as over gRPC (edge dataclass -> rankfed.v1 message ->
coordinator dataclass -> `Federation` -> back), and coordinator errors become the same edge
exceptions, through the same two tables (`servicer_errors.status_of`, then
`transport.STATUS_TO_ERROR`). Only the sockets and the chunk framing are skipped.

Compute slots: a simulation of many clients on one machine bounds how many train at once.
A client takes a slot when it downloads a round's adapter (the start of its local work) and
gives it back when it uploads, or at its next GetTask/Leave if it abandoned the round.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from rankfed.aggregation import AdapterError as AggregationAdapterError
from rankfed.coordinator import errors as coordinator_errors
from rankfed.coordinator.servicer_errors import status_of
from rankfed.edge_client.errors import DuplicateError, IntegrityError, TransportError
from rankfed.edge_client.transport import STATUS_TO_ERROR, held_is_ours
from rankfed.protocol import (
    Chunk,
    DecodeError,
    DownloadRequest,
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
    serde,
)

from .host import FederationHost

ProgressFn = Callable[[int, int], None]
_CORE_ERRORS = (coordinator_errors.CoordinatorError, AggregationAdapterError, DecodeError)


def edge_error(exc: Exception, what: str) -> TransportError:
    """The edge exception a gRPC client would see for this coordinator exception."""
    code = status_of(exc)
    if code is None:  # a bug in the core: INTERNAL over gRPC
        return TransportError(f"{what}: INTERNAL: {exc!r}", code="INTERNAL")
    cls = STATUS_TO_ERROR.get(code, TransportError)
    return cls(f"{what}: {code.name}: {exc}", code=code.name, detail=getattr(exc, "detail", None))


class InProcessTransport:
    """One device's connection to an in-process `Federation`."""

    def __init__(self, host: FederationHost, *, compute: threading.Semaphore | None = None) -> None:
        self._host = host
        self._compute = compute
        self._holding = False
        self._token = ""
        self._device_key = ""  # issued at this virtual device's first Join
        # Nothing crosses a link: 0 means "not measured", so the runner never re-joins for it.
        self.upload_bytes_per_second = 0.0
        self.download_bytes_per_second = 0.0
        self.bytes_down = 0
        self.bytes_up = 0

    # -- compute slots ----------------------------------------------------------------------

    def _take_slot(self) -> None:
        if self._compute is not None and not self._holding:
            self._compute.acquire()
            self._holding = True

    def _give_slot(self) -> None:
        if self._compute is not None and self._holding:
            self._holding = False
            self._compute.release()

    # -- calls ------------------------------------------------------------------------------

    def _run(self, what: str, fn: Callable[[], object], *, timeout: float | None = 120.0):
        async def run():
            try:
                value = fn()
                if hasattr(value, "__await__"):
                    value = await value
                return value, None
            except _CORE_ERRORS as exc:
                return None, exc

        value, exc = self._host.submit(run(), timeout)
        if exc is not None:
            raise edge_error(exc, what)
        return value

    def _client_id(self) -> str:
        return self._host.fed().authenticate(self._token)

    def join(self, request: JoinRequest) -> JoinResult:
        if not request.device_key and self._device_key:
            request = replace(request, device_key=self._device_key)
        proto = serde.join_request_to_proto(request)
        fed = self._host.fed()

        def call():
            return serde.join_result_to_proto(fed.join(serde.join_request_from_proto(proto)))

        result = serde.join_result_from_proto(self._run("Join", call))
        self._device_key = result.device_key or self._device_key
        self._token = result.session_token
        return result

    def get_task(self, max_wait_s: float) -> Task | None:
        self._give_slot()
        proto = serde.get_task_request_to_proto(max_wait_s)
        fed = self._host.fed()

        async def call():
            task = await fed.get_task(self._client_id(), serde.get_task_request_from_proto(proto))
            return serde.task_to_proto(task)

        return serde.task_from_proto(self._run("GetTask", call, timeout=None))

    def download(
        self, round: int, *, expected_sha256: str = "", progress: ProgressFn | None = None, full: bool = False
    ) -> tuple[TransferManifest, bytes]:
        if round > 0:
            self._take_slot()
        fed = self._host.fed()

        async def call():
            request = serde.download_request_from_proto(
                serde.download_request_to_proto(DownloadRequest(round=round, offset=0, full=full))
            )
            manifest, chunks = await fed.open_download(self._client_id(), request)
            parts = [chunk async for chunk in chunks]
            return serde.transfer_manifest_to_proto(manifest), b"".join(parts)

        try:
            message, data = self._run("DownloadAdapter", call)
        except BaseException:
            self._give_slot()
            raise
        manifest = serde.transfer_manifest_from_proto(message)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != manifest.total_bytes or digest != manifest.sha256:
            raise IntegrityError(f"DownloadAdapter: got {len(data)} bytes with sha256 {digest}, manifest says "
                                 f"{manifest.total_bytes} bytes {manifest.sha256}")
        if expected_sha256 and digest != expected_sha256:
            raise IntegrityError(f"DownloadAdapter: got adapter {digest}, the task announced {expected_sha256}")
        self.bytes_down += len(data)
        if progress is not None:
            progress(len(data), len(data))
        return manifest, data

    def upload(self, header: UploadHeader, blob: bytes, *, progress: ProgressFn | None = None) -> UploadReceipt:
        try:
            return self._upload(header, blob, progress)
        finally:
            self._give_slot()

    def _upload(self, header: UploadHeader, blob: bytes, progress: ProgressFn | None) -> UploadReceipt:
        if header.total_bytes != len(blob) or header.sha256 != hashlib.sha256(blob).hexdigest():
            raise ValueError("upload header does not describe the blob (size or sha256)")
        message = serde.upload_header_to_proto(header)
        fed = self._host.fed()
        chunk = fed.config.server.max_chunk_bytes

        async def chunks() -> AsyncIterator[Chunk]:
            for offset in range(0, len(blob), chunk):
                yield Chunk(offset=offset, data=blob[offset : offset + chunk])

        async def call():
            return await fed.upload(self._client_id(), serde.upload_header_from_proto(message), chunks())

        try:
            receipt = self._run("UploadUpdate", call)
        except DuplicateError as err:
            if held_is_ours(err, header):  # our own update was already accepted
                return UploadReceipt(round=header.round, bytes_received=len(blob), sha256=header.sha256, duplicate=True)
            raise
        self.bytes_up += len(blob)
        if progress is not None:
            progress(len(blob), len(blob))
        return UploadReceipt(
            round=receipt.round, bytes_received=receipt.nbytes, sha256=receipt.sha256,
            receipt_id=receipt.receipt_id, accepted_at=receipt.accepted_at,
        )

    def heartbeat(self, round: int, state: ParticipantState, progress: float) -> HeartbeatResult:
        proto = serde.heartbeat_request_to_proto(HeartbeatRequest(round=round, state=state, progress=progress))
        fed = self._host.fed()

        def call():
            result = fed.heartbeat(self._client_id(), serde.heartbeat_request_from_proto(proto))
            return serde.heartbeat_result_to_proto(result)

        return serde.heartbeat_result_from_proto(self._run("Heartbeat", call, timeout=30.0))

    def leave(self, reason: str) -> None:
        self._give_slot()
        fed = self._host.fed()
        proto = serde.leave_request_to_proto(LeaveRequest(reason=reason))
        self._run("Leave", lambda: fed.leave(self._client_id(), serde.leave_request_from_proto(proto)))

