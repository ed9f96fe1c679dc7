"""EvaluatorService: thin handlers for the evaluator role (`rankfed edge evaluate`), over the
Federation's evaluation core calls.

Credentials: `authorization: Bearer <server.evaluator_token>` (opens this service only), or
the operator's credentials (the admin token, an operator certificate, or loopback with
server.loopback_operators). A device session token is refused with PERMISSION_DENIED: the
caller is known, but a device may not see other devices' updates.
"""

from __future__ import annotations

import secrets
from typing import Any

from rankfed.coordinator.auth import bearer_token
from rankfed.coordinator.errors import AuthError, PermissionDeniedError
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.metrics import CoordinatorMetrics
from rankfed.coordinator.servicer_admin import authorize_operator
from rankfed.coordinator.servicer_edge import write_download
from rankfed.coordinator.servicer_errors import ServicerContext, unary
from rankfed.protocol import serde
from rankfed.v1 import evaluator_pb2 as ProtoEvaluator
from rankfed.v1 import evaluator_pb2_grpc

_API = "the evaluator API (EvaluatorService)"


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self, federation: Federation, admin_token: str, evaluator_token: str = "",
                 metrics: CoordinatorMetrics | None = None) -> None:
        self._fed = federation
        self._admin_token = admin_token
        self._evaluator_token = evaluator_token
        self.metrics = metrics or CoordinatorMetrics()

    def _authorize(self, context: ServicerContext) -> str:
        """Who the evaluator is (for the log); AuthError or PermissionDeniedError otherwise."""
        token = bearer_token(dict(context.invocation_metadata() or ()))
        if token is not None and self._evaluator_token and secrets.compare_digest(
            token.encode(), self._evaluator_token.encode()
        ):
            return f"evaluator token from {context.peer()}"
        # A device is known but may not see other devices' updates, even from loopback.
        if token is not None and self._is_device_token(token):
            raise PermissionDeniedError(
                f"a device session token cannot use {_API}; use server.evaluator_token or operator credentials"
            )
        return authorize_operator(context, self._admin_token, api=_API)

    def _is_device_token(self, token: str) -> bool:
        try:
            self._fed.authenticate(token)
        except AuthError:
            return False
        return True

    @unary
    async def GetEvaluationTask(
        self, request: ProtoEvaluator.GetEvaluationTaskRequest, context: ServicerContext
    ) -> ProtoEvaluator.EvaluationTaskResponse:
        self._authorize(context)
        task = await self._fed.evaluation_task(serde.evaluation_task_request_from_proto(request))
        return serde.evaluator_task_to_proto(task)

    # A coroutine that writes (see servicer_edge.write_download), not an async generator.
    @unary
    async def DownloadEvaluationAdapter(  # type: ignore[override]
        self, request: ProtoEvaluator.EvaluationDownloadRequest, context: Any
    ) -> None:
        self._authorize(context)
        download = serde.evaluation_download_request_from_proto(request)
        manifest, chunks = await self._fed.open_evaluation_download(download)
        await write_download(context, manifest, chunks, offset=download.offset, server=self._fed.config.server,
                             on_bytes=self.metrics.bytes_out.inc)

    @unary
    async def ReportScores(
        self, request: ProtoEvaluator.ScoreReport, context: ServicerContext
    ) -> ProtoEvaluator.ScoreReportResponse:
        who = self._authorize(context)
        receipt = self._fed.report_scores(serde.score_report_from_proto(request), who)
        return serde.score_receipt_to_proto(receipt)
