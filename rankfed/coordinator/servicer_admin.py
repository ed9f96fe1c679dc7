"""AdminService: round status, a stream of status changes, the client list.

Operators prove themselves with `server.admin_token` (a bearer token, never a device's
session token) or an operator certificate (mutual TLS, OU=operators). With no admin token
configured, only loopback callers and operator certificates get in.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from rankfed.coordinator.auth import bearer_token
from rankfed.coordinator.errors import AuthError, PermissionDeniedError
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.metrics import CoordinatorMetrics
from rankfed.coordinator.servicer_errors import ServicerContext, streaming, unary
from rankfed.protocol import FederationStatus, limits, serde
from rankfed.tls import OPERATOR_OU, peer_identity, peer_is_loopback
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, federation: Federation, admin_token: str, metrics: CoordinatorMetrics | None = None) -> None:
        self._fed = federation
        self._token = admin_token
        self.metrics = metrics or CoordinatorMetrics()
        # The status WatchRounds converted last, and its message: the streams woken by one
        # change are sent the same status object (StatusView.watch), converted once here.
        self._converted: tuple[FederationStatus, ProtoAdmin.FederationStatus] | None = None

    def _authorize(self, context: ServicerContext) -> str:
        """Who the operator is (for the log of operator actions); AuthError otherwise."""
        return authorize_operator(context, self._token)

    @unary
    async def GetRoundStatus(
        self, request: ProtoAdmin.GetRoundStatusRequest, context: ServicerContext
    ) -> ProtoAdmin.FederationStatus:
        self._authorize(context)
        return serde.federation_status_to_proto(
            self._fed.status(request.history_limit, page_size=request.page_size, page_token=request.page_token)
        )

    @streaming
    async def WatchRounds(
        self, request: ProtoAdmin.WatchRoundsRequest, context: ServicerContext
    ) -> AsyncIterator[ProtoAdmin.FederationStatus]:
        self._authorize(context)
        async for view in self._fed.watch(request.history_limit):
            yield self._watch_message(view)

    def _watch_message(self, view: FederationStatus) -> ProtoAdmin.FederationStatus:
        # One slot, matched by identity (it holds the view, so the id is not reused): streams
        # of different history_limits alternate, each still converted correctly. The message
        # is shared read-only; gRPC only serializes it.
        converted = self._converted
        if converted is None or converted[0] is not view:
            converted = self._converted = (view, serde.federation_status_to_proto(view))
        return converted[1]

    @unary
    async def ListClients(
        self, request: ProtoAdmin.ListClientsRequest, context: ServicerContext
    ) -> ProtoAdmin.ListClientsResponse:
        self._authorize(context)
        return serde.client_page_to_proto(self._fed.client_page(request.page_size, request.page_token))

    # ------------------------------------------------------------------ operator controls

    @unary
    async def PauseFederation(self, request: ProtoAdmin.ControlRequest, context: ServicerContext) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        return ProtoAdmin.ControlResponse(message=self._fed.pause(operator, _reason(request.reason)))

    @unary
    async def ResumeFederation(self, request: ProtoAdmin.ControlRequest, context: ServicerContext) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        return ProtoAdmin.ControlResponse(message=self._fed.resume(operator, _reason(request.reason)))

    @unary
    async def CloseRound(self, request: ProtoAdmin.ControlRequest, context: ServicerContext) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        return ProtoAdmin.ControlResponse(message=self._fed.close_round(operator, _reason(request.reason)))

    @unary
    async def StopFederation(self, request: ProtoAdmin.ControlRequest, context: ServicerContext) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        return ProtoAdmin.ControlResponse(message=self._fed.stop_federation(operator, _reason(request.reason)))

    @unary
    async def RemoveDevice(
        self, request: ProtoAdmin.RemoveDeviceRequest, context: ServicerContext
    ) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        message = self._fed.remove_device(operator, request.device_name, ban=request.ban, reason=_reason(request.reason))
        return ProtoAdmin.ControlResponse(message=message)

    @unary
    async def AllowDevice(self, request: ProtoAdmin.AllowDeviceRequest, context: ServicerContext) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        return ProtoAdmin.ControlResponse(message=self._fed.allow_device(operator, request.device_name))

    @unary
    async def StartFederation(self, request: ProtoAdmin.ControlRequest, context: ServicerContext) -> ProtoAdmin.ControlResponse:
        operator = self._authorize(context)
        return ProtoAdmin.ControlResponse(message=await self._fed.new_run(operator, _reason(request.reason)))


def authorize_operator(context: ServicerContext, admin_token: str, *, api: str = "the operator API") -> str:
    """Who the operator is (for the log of operator actions); AuthError or PermissionDeniedError
    otherwise. `api` names what was called, in the errors."""
    identity = peer_identity(context.auth_context())
    if identity is not None and identity.is_operator:
        return f"certificate {identity.common_name}"
    token = bearer_token(dict(context.invocation_metadata() or ()))
    if admin_token:
        if token is not None and secrets.compare_digest(token.encode(), admin_token.encode()):
            return f"admin token from {context.peer()}"
        raise AuthError(
            f"{api} needs 'authorization: Bearer <admin token>' (server.admin_token) "
            f"or an operator certificate (OU={OPERATOR_OU}); device session tokens are not accepted"
        )
    if identity is not None:
        raise PermissionDeniedError(
            f"a device certificate cannot use {api}; use one with OU={OPERATOR_OU} or an admin token"
        )
    if not peer_is_loopback(context.peer()):
        raise PermissionDeniedError(
            f"server.admin_token is not set, so {api} answers only loopback callers and "
            f"operator certificates (OU={OPERATOR_OU}); set an admin token to manage it remotely"
        )
    return f"loopback {context.peer()}"


def _reason(text: str) -> str:
    limits.check_text(text, "reason", limits.MAX_REASON_CHARS)
    return text
