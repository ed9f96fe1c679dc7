"""The evaluator role's calls to a coordinator's EvaluatorService, over the same `Connection`
(retries, backoff, resumable verified downloads) as a device's `EdgeTransport`. Takes and
returns `rankfed.protocol` dataclasses; gRPC errors become the `errors.TransportError` family.

    with EvaluatorTransport("coordinator:50051", token=token, tls=tls) as transport:
        task = transport.get_task(EvaluationTaskRequest(max_wait_s=30))
        manifest, blob = transport.download(task)
        transport.report(ScoreReport(...))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from rankfed.protocol import (
    EvaluationDownloadRequest,
    EvaluationTask,
    EvaluationTaskRequest,
    EvaluatorTask,
    ScoreReceipt,
    ScoreReport,
    TransferManifest,
    serde,
)
from rankfed.tls import TlsOptions
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import evaluator_pb2_grpc as ProtoEvaluatorGrpc

from .transport import Connection, ProgressFn, RetryPolicy


class EvaluatorTransport(Connection):
    """A connection to one coordinator's EvaluatorService. ``token``: server.evaluator_token
    or the operator's admin token ("" with an operator certificate or loopback operators)."""

    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        tls: TlsOptions | None = None,
        retry: RetryPolicy = RetryPolicy(),
        call_timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        super().__init__(address, tls=tls, retry=retry, call_timeout_s=call_timeout_s, sleep=sleep, seed=seed)
        self._stub = ProtoEvaluatorGrpc.EvaluatorServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def get_task(self, request: EvaluationTaskRequest) -> EvaluatorTask | None:
        proto = serde.evaluation_task_request_to_proto(request)

        def call(_: int) -> EvaluatorTask | None:
            response = self._stub.GetEvaluationTask(
                proto, timeout=request.max_wait_s + self.call_timeout_s, metadata=self._metadata
            )
            return serde.evaluator_task_from_proto(response)

        return self.with_retries("GetEvaluationTask", call)

    def download(self, task: EvaluationTask, *, progress: ProgressFn | None = None) -> tuple[TransferManifest, bytes]:
        """The adapter `task` names, checked against the task's digest."""

        def open_stream(offset: int) -> Iterable[ProtoEdge.DownloadMessage]:
            request = EvaluationDownloadRequest(kind=task.kind, round=task.round, client_id=task.client_id,
                                                offset=offset)
            return self._stub.DownloadEvaluationAdapter(
                serde.evaluation_download_request_to_proto(request), timeout=self.call_timeout_s * 10,
                metadata=self._metadata,
            )

        return self.receive("DownloadEvaluationAdapter", open_stream, expected_sha256=task.adapter_sha256,
                            progress=progress)

    def report(self, report: ScoreReport) -> ScoreReceipt:
        proto = serde.score_report_to_proto(report)

        def call(_: int) -> ScoreReceipt:
            response = self._stub.ReportScores(proto, timeout=self.call_timeout_s, metadata=self._metadata)
            return serde.score_receipt_from_proto(response)

        return self.with_retries("ReportScores", call)
