"""AdminService: round status, a stream of status changes, the client list."""

from __future__ import annotations

import secrets

from rankfed.coordinator import serde
from rankfed.coordinator.auth import bearer_token
from rankfed.coordinator.errors import AuthError
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.servicer_errors import streaming, unary
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, federation: Federation, admin_token: str) -> None:
        self._fed = federation
        self._token = admin_token

    def _authorize(self, context) -> None:
        if not self._token:
            return
        token = bearer_token(dict(context.invocation_metadata() or ()))
        if token is None or not secrets.compare_digest(token, self._token):
            raise AuthError("the operator API needs 'authorization: Bearer <admin token>' (server.admin_token)")

    @unary
    async def GetRoundStatus(self, request: ProtoAdmin.GetRoundStatusRequest, context) -> ProtoAdmin.FederationStatus:
        self._authorize(context)
        return serde.federation_to_proto(self._fed.status(request.history_limit))

    @streaming
    async def WatchRounds(self, request: ProtoAdmin.WatchRoundsRequest, context):
        self._authorize(context)
        async for view in self._fed.watch(request.history_limit):
            yield serde.federation_to_proto(view)

    @unary
    async def ListClients(self, request: ProtoAdmin.ListClientsRequest, context) -> ProtoAdmin.ListClientsResponse:
        self._authorize(context)
        return ProtoAdmin.ListClientsResponse(
            clients=[serde.client_to_proto(c, online) for c, online in self._fed.list_clients()]
        )
