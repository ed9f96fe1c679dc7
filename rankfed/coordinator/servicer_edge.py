"""EdgeService: thin handlers that convert, call the Federation, convert back.

Credentials: Join needs the enrollment secret, or a verified client certificate (mutual
TLS) whose CN or DNS SAN is the device name; every later call needs the session token
from Join, and under mutual TLS that token must belong to the certificate's device.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import cast

import grpc

from rankfed.coordinator.auth import bearer_token
from rankfed.coordinator.config import ServerConfig
from rankfed.coordinator.errors import (
    AuthError,
    InvalidArgumentError,
    PermissionDeniedError,
    StreamTimeoutError,
)
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.metrics import CoordinatorMetrics
from rankfed.coordinator.servicer_errors import unary
from rankfed.coordinator.upload_wire import Malformed, RawChunk, UploadPart, upload_message_from_bytes
from rankfed.protocol import Chunk, TransferManifest, UploadHeader, UploadReceipt, WaitTask, serde
from rankfed.tls import peer_identity
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import edge_pb2_grpc

EDGE_SERVICE = ProtoEdge.DESCRIPTOR.services_by_name["EdgeService"].full_name


class TimedStream:
    """A client stream whose every message must arrive within `idle` seconds, and the whole
    stream within `total` seconds of its start (a slow-loris client holds nothing for long).

    One timer per stream, re-armed at most once per `idle` seconds, watches the wait for
    the next message; when a limit passes it cancels the handler task, and `next()` turns
    that cancellation into StreamTimeoutError. (Wrapping every receive in asyncio.wait_for
    cost a task, a timer and two extra event-loop turns per message.) Call `close()` when
    done with the stream."""

    def __init__(self, iterator, *, idle: float, total: float) -> None:
        self._it = aiter(iterator)
        self._idle, self._total = idle, total
        self._loop = asyncio.get_running_loop()
        self._until = self._loop.time() + total
        self._waiting_since: float | None = None
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired: StreamTimeoutError | None = None

    async def next(self):
        """The next message, or None at the end of the stream."""
        if self._expired is not None:
            raise self._expired
        now = self._loop.time()
        if now >= self._until:
            raise self._late()
        if self._timer is None:
            self._task = asyncio.current_task()
            self._timer = self._loop.call_at(min(now + self._idle, self._until), self._watch)
        self._waiting_since = now
        try:
            message = await anext(self._it, None)
            if message is None:
                self.close()  # the client sent everything: what the server does next is not its wait
            return message
        except asyncio.CancelledError:
            if self._expired is not None and self._task is not None and self._task.uncancel() == 0:
                raise self._expired from None  # our own watchdog, not the client going away
            raise
        finally:
            self._waiting_since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _watch(self) -> None:
        now = self._loop.time()
        since = self._waiting_since
        if since is not None and (now >= self._until or now - since >= self._idle):
            self._timer = None
            self._expired = self._late() if now >= self._until else StreamTimeoutError(
                f"upload stream sent nothing for {self._idle:g} s (server.upload_idle_timeout_seconds); "
                "it was aborted: resume it (UploadStatus) or send it again", reason="idle_timeout",
            )
            assert self._task is not None
            self._task.cancel()
            return
        if since is None and now >= self._until:
            # Past the total limit between two messages: next() refuses on its own. A timer
            # re-armed at `_until` would fire again at once, forever.
            self._timer = None
            return
        due = (since if since is not None else now) + self._idle
        self._timer = self._loop.call_at(min(due, self._until), self._watch)

    def _late(self) -> StreamTimeoutError:
        return StreamTimeoutError(
            f"upload took longer than {self._total:g} s (server.upload_total_timeout_seconds); "
            "it was aborted: resume it (UploadStatus) over a faster link, or ask for a lower rank",
            reason="total_timeout",
        )


def _upload_header(message: UploadPart | None) -> UploadHeader:
    if isinstance(message, Malformed):
        raise InvalidArgumentError(message.reason)
    if not isinstance(message, ProtoEdge.UploadMessage) or message.WhichOneof("kind") != "header":
        raise InvalidArgumentError("an upload must start with an UploadHeader message")
    return serde.upload_header_from_proto(message.header)


def _chunk(message: UploadPart) -> RawChunk:
    if isinstance(message, RawChunk):
        return message
    if isinstance(message, Malformed):
        raise InvalidArgumentError(message.reason)
    if message.WhichOneof("kind") != "chunk":
        raise InvalidArgumentError("only chunks may follow the upload header")
    return RawChunk(offset=message.chunk.offset, data=memoryview(message.chunk.data))


def add_edge_service(servicer: EdgeServicer, server: grpc.aio.Server) -> None:
    """Register EdgeService as generated, except that UploadUpdate's requests are parsed by
    `upload_wire` (chunk bytes as views of the received message: no copies)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class _Collect:  # takes the generated method table instead of a server
        def add_generic_rpc_handlers(self, _handlers) -> None:
            pass

        def add_registered_method_handlers(self, _service, table) -> None:
            handlers.update(table)

    # The generated function only calls the two methods above on its `server`.
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, cast(grpc.aio.Server, _Collect()))
    generated = handlers["UploadUpdate"]
    handlers["UploadUpdate"] = grpc.stream_unary_rpc_method_handler(
        servicer.UploadUpdate, request_deserializer=upload_message_from_bytes,
        response_serializer=generated.response_serializer,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EDGE_SERVICE, handlers),))
    server.add_registered_method_handlers(EDGE_SERVICE, handlers)


async def write_download(
    context: grpc.aio.ServicerContext, manifest: TransferManifest, chunks: AsyncGenerator[bytes, None], *,
    offset: int, server: ServerConfig, on_bytes: Callable[[int], None],
) -> None:
    """Write a download stream (the manifest, then chunks from `offset`), each write bounded
    by server.download_idle_timeout_seconds and the whole by download_total_timeout_seconds.

    A coroutine that writes (not an async generator that yields): a yielded message is
    sent by grpc's own loop, where no timeout of ours can reach a write blocked on flow
    control; here each write is our await, bounded like an upload's receives."""
    idle, total = server.download_idle_timeout_seconds, server.download_total_timeout_seconds
    loop = asyncio.get_running_loop()
    until = loop.time() + total

    async def send(message: ProtoEdge.DownloadMessage) -> None:
        # The write returns once gRPC's flow control takes the message; a client that
        # stopped reading keeps it waiting. Whichever limit comes first applies.
        idle_ends = loop.time() + idle
        try:
            async with asyncio.timeout_at(min(idle_ends, until)):
                await context.write(message)
        except TimeoutError:
            if idle_ends <= until:
                raise StreamTimeoutError(
                    f"the client took no data for {idle:g} s (server.download_idle_timeout_seconds); the "
                    "download was aborted, resume it with offset = bytes received", reason="idle_timeout",
                ) from None
            raise StreamTimeoutError(
                f"download took longer than {total:g} s (server.download_total_timeout_seconds); it was "
                "aborted, resume it with offset = bytes received over a faster link", reason="total_timeout",
            ) from None

    async with contextlib.aclosing(chunks):  # closes the adapter file however we leave
        await send(ProtoEdge.DownloadMessage(manifest=serde.transfer_manifest_to_proto(manifest)))
        async for data in chunks:
            await send(ProtoEdge.DownloadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data)))
            offset += len(data)
            on_bytes(len(data))


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
        started, max_wait = time.perf_counter(), serde.get_task_request_from_proto(request)
        task = await self._fed.get_task(client_id, max_wait)
        if isinstance(task, WaitTask):  # a held long-poll: only the time past its due moment is ours
            due = min(max(max_wait, 0.0), self._fed.config.server.long_poll_seconds)
            self.metrics.get_task_overrun.observe(max(0.0, time.perf_counter() - started - due))
        return serde.task_to_proto(task)

    # A coroutine that writes (see write_download), not an async generator: grpc.aio serves
    # both forms; the generated stub types only the generator one.
    @unary
    async def DownloadAdapter(  # type: ignore[override]
        self, request: ProtoEdge.DownloadRequest, context
    ) -> None:
        client_id = self._client_id(context)
        manifest, chunks = await self._fed.open_download(client_id, serde.download_request_from_proto(request))
        await write_download(context, manifest, chunks, offset=request.offset, server=self._fed.config.server,
                             on_bytes=self.metrics.bytes_out.inc)

    @unary
    async def UploadUpdate(self, request_iterator, context) -> ProtoEdge.UploadReceipt:
        client_id = self._client_id(context)
        server = self._fed.config.server
        stream = TimedStream(
            request_iterator, idle=server.upload_idle_timeout_seconds, total=server.upload_total_timeout_seconds
        )
        try:
            header = _upload_header(await stream.next())
            receipt = await self._fed.upload(client_id, header, self._chunks(stream))
        finally:
            stream.close()
        return serde.upload_receipt_to_proto(UploadReceipt(
            round=receipt.round, bytes_received=receipt.nbytes, sha256=receipt.sha256,
            accepted_at=receipt.accepted_at, receipt_id=receipt.receipt_id,
        ))

    @unary
    async def UploadStatus(self, request: ProtoEdge.UploadStatusRequest, context) -> ProtoEdge.UploadStatusResponse:
        client_id = self._client_id(context)
        result = await self._fed.upload_status(client_id, serde.upload_status_request_from_proto(request))
        return serde.upload_status_result_to_proto(result)

    async def _chunks(self, stream: TimedStream) -> AsyncIterator[Chunk]:
        """The chunk messages after the header, as the core's input (data: a view, no copy)."""
        while (message := await stream.next()) is not None:
            chunk = _chunk(message)
            self.metrics.bytes_in.inc(len(chunk.data))
            yield Chunk(offset=chunk.offset, data=chunk.data)  # type: ignore[arg-type]  # a memoryview

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
