"""EdgeService: thin handlers that convert, call the Federation, convert back.

Credentials: Join needs the enrollment secret, or a verified client certificate (mutual
TLS) whose CN or DNS SAN is the device name; every later call needs the session token
from Join, and under mutual TLS that token must belong to the certificate's device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from rankfed.coordinator.auth import bearer_token
from rankfed.coordinator.errors import (
    AuthError,
    InvalidArgumentError,
    PermissionDeniedError,
    StreamTimeoutError,
)
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.metrics import CoordinatorMetrics
from rankfed.coordinator.servicer_errors import streaming, unary
from rankfed.protocol import Chunk, UploadReceipt, serde
from rankfed.tls import peer_identity
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import edge_pb2_grpc


class TimedStream:
    """A client stream whose every message must arrive within `idle` seconds, and the whole
    stream within `total` seconds of its start (a slow-loris client holds nothing for long)."""

    def __init__(self, iterator, *, idle: float, total: float) -> None:
        self._it = aiter(iterator)
        self._idle, self._total = idle, total
        self._until = time.monotonic() + total

    async def next(self):
        """The next message, or None at the end of the stream."""
        left = self._until - time.monotonic()
        if left <= 0:
            raise self._late()
        try:
            async with asyncio.timeout(min(self._idle, left)):  # not wait_for: see Federation._wait_change
                return await anext(self._it, None)
        except TimeoutError:
            if time.monotonic() >= self._until:
                raise self._late() from None
            raise StreamTimeoutError(
                f"upload stream sent nothing for {self._idle:g} s (server.upload_idle_timeout_seconds); "
                "it was aborted, resend the whole update", reason="idle_timeout",
            ) from None

    def _late(self) -> StreamTimeoutError:
        return StreamTimeoutError(
            f"upload took longer than {self._total:g} s (server.upload_total_timeout_seconds); "
            "it was aborted, resend it over a faster link or ask for a lower rank", reason="total_timeout",
        )


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, federation: Federation, metrics: CoordinatorMetrics | None = None) -> None:
        self._fed = federation
        self.metrics = metrics or CoordinatorMetrics()

    def _client_id(self, context: grpc.aio.ServicerContext) -> str:
        client_id = self._fed.authenticate(bearer_token(dict(context.invocation_metadata() or ())))
        identity = peer_identity(context.auth_context())
        if identity is not None:
            name = self._fed.client(client_id).device_name
            if name not in identity.names():
                raise AuthError(
                    f"this session token belongs to device {name!r}, not to the certificate's "
                    f"{identity.common_name!r}; join with your own certificate"
                )
        return client_id

    @unary
    async def Join(self, request: ProtoEdge.JoinRequest, context) -> ProtoEdge.JoinResponse:
        info = serde.join_request_from_proto(request)
        identity = peer_identity(context.auth_context())
        if identity is not None:
            if identity.is_operator:
                raise PermissionDeniedError("an operator certificate (OU=operators) cannot join as a device")
            if not info.device_name.strip():
                info = replace(info, device_name=identity.common_name)
            elif info.device_name.strip() not in identity.names():
                raise PermissionDeniedError(
                    f"device_name {info.device_name.strip()!r} is not a name in this client certificate "
                    f"({', '.join(identity.names())}); leave it empty to use the certificate's CN"
                )
        result = self._fed.join(info, enrolled_by_certificate=identity is not None)
        return serde.join_result_to_proto(result)

    @unary
    async def GetTask(self, request: ProtoEdge.GetTaskRequest, context) -> ProtoEdge.Task:
        client_id = self._client_id(context)
        task = await self._fed.get_task(client_id, serde.get_task_request_from_proto(request))
        return serde.task_to_proto(task)

    @streaming
    async def DownloadAdapter(self, request: ProtoEdge.DownloadRequest, context):
        client_id = self._client_id(context)
        manifest, chunks = await self._fed.open_download(client_id, serde.download_request_from_proto(request))
        yield ProtoEdge.DownloadMessage(manifest=serde.transfer_manifest_to_proto(manifest))
        offset = request.offset
        async for data in chunks:
            yield ProtoEdge.DownloadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data))
            offset += len(data)
            self.metrics.bytes_out.inc(len(data))

    @unary
    async def UploadUpdate(self, request_iterator, context) -> ProtoEdge.UploadReceipt:
        client_id = self._client_id(context)
        server = self._fed.config.server
        stream = TimedStream(
            request_iterator, idle=server.upload_idle_timeout_seconds, total=server.upload_total_timeout_seconds
        )
        first = await stream.next()
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgumentError("an upload must start with an UploadHeader message")

        async def chunks() -> AsyncIterator[Chunk]:
            while (message := await stream.next()) is not None:
                if message.WhichOneof("kind") != "chunk":
                    raise InvalidArgumentError("only chunks may follow the upload header")
                self.metrics.bytes_in.inc(len(message.chunk.data))
                yield Chunk(offset=message.chunk.offset, data=message.chunk.data)

        receipt = await self._fed.upload(client_id, serde.upload_header_from_proto(first.header), chunks())
        return serde.upload_receipt_to_proto(UploadReceipt(
            round=receipt.round, bytes_received=receipt.nbytes, sha256=receipt.sha256,
            accepted_at=receipt.accepted_at, receipt_id=receipt.receipt_id,
        ))

    @unary
    async def Heartbeat(self, request: ProtoEdge.HeartbeatRequest, context) -> ProtoEdge.HeartbeatResponse:
        client_id = self._client_id(context)
        result = self._fed.heartbeat(client_id, serde.heartbeat_request_from_proto(request))
        return serde.heartbeat_result_to_proto(result)

    @unary
    async def Leave(self, request: ProtoEdge.LeaveRequest, context) -> ProtoEdge.LeaveResponse:
        client_id = self._client_id(context)
        self._fed.leave(client_id, serde.leave_request_from_proto(request))
        return ProtoEdge.LeaveResponse()
