"""EdgeService: thin handlers that convert, call the Federation, convert back."""

from __future__ import annotations

import grpc

from rankfed.coordinator import serde
from rankfed.coordinator.auth import bearer_token
from rankfed.coordinator.errors import InvalidUpdateError
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.servicer_errors import streaming, unary
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import edge_pb2_grpc


def _client_id(federation: Federation, context: grpc.aio.ServicerContext) -> str:
    return federation.authenticate(bearer_token(dict(context.invocation_metadata() or ())))


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, federation: Federation) -> None:
        self._fed = federation

    @unary
    async def Join(self, request: ProtoEdge.JoinRequest, context) -> ProtoEdge.JoinResponse:
        result = self._fed.join(serde.join_info_from_proto(request))
        return serde.join_result_to_proto(result, serde.base_model_to_proto(self._fed.status(history_limit=1)))

    @unary
    async def GetTask(self, request: ProtoEdge.GetTaskRequest, context) -> ProtoEdge.Task:
        client_id = _client_id(self._fed, context)
        task = await self._fed.get_task(client_id, serde.duration_from_proto(request.max_wait))
        return serde.task_to_proto(task)

    @streaming
    async def DownloadAdapter(self, request: ProtoEdge.DownloadRequest, context):
        client_id = _client_id(self._fed, context)
        manifest, chunks = await self._fed.open_download(client_id, request.round, request.offset)
        yield serde.transfer_manifest_to_proto(manifest)
        offset = request.offset
        async for data in chunks:
            yield ProtoEdge.DownloadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data))
            offset += len(data)

    @unary
    async def UploadUpdate(self, request_iterator, context) -> ProtoEdge.UploadReceipt:
        client_id = _client_id(self._fed, context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidUpdateError("an upload must start with an UploadHeader message")
        session = self._fed.begin_upload(client_id, serde.upload_header_from_proto(first.header))
        try:
            async for message in request_iterator:
                if message.WhichOneof("kind") != "chunk":
                    raise InvalidUpdateError("only chunks may follow the upload header")
                session.add_chunk(message.chunk.offset, message.chunk.data)
            receipt = await self._fed.finish_upload(session)
        except BaseException:
            # Broken stream, cancelled call or rejected content: leave no trace.
            self._fed.abort_upload(session)
            raise
        accepted = serde.timestamp(receipt.accepted_at)
        return ProtoEdge.UploadReceipt(
            round=receipt.round, bytes_received=receipt.nbytes, sha256=receipt.sha256,
            accepted_at=accepted, receipt_id=receipt.receipt_id,
        )

    @unary
    async def Heartbeat(self, request: ProtoEdge.HeartbeatRequest, context) -> ProtoEdge.HeartbeatResponse:
        client_id = _client_id(self._fed, context)
        result = self._fed.heartbeat(
            client_id, request.round, serde.participant_state_from_proto(request.state), request.progress
        )
        return ProtoEdge.HeartbeatResponse(next_in=serde.duration(result.next_in), round_open=result.round_open)

    @unary
    async def Leave(self, request: ProtoEdge.LeaveRequest, context) -> ProtoEdge.LeaveResponse:
        client_id = _client_id(self._fed, context)
        self._fed.leave(client_id, request.reason)
        return ProtoEdge.LeaveResponse()
