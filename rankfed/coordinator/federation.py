"""The federation: one object per coordinator that every transport drives, one call per RPC.

It composes the parts, each in its own module and readable in one sitting:
    registry.py     devices, sessions and liveness (Join, Leave, Heartbeat, ListClients)
    dispatch.py     tasks and downloads (GetTask, DownloadAdapter)
    evaluations.py  the evaluator role: what needs a score, its bytes, the scores (EvaluatorService)
    ingest.py       uploads: store, verify, fsync, receipt, fold (UploadUpdate, UploadStatus)
    staging.py      bytes of broken uploads kept for a resume
    rounds.py       the round loop, crash resume, aggregation at close
    rank_planner.py ranks for a round (tiers, scores, method traits, byte budget)
    status_view.py  what operators see (GetRoundStatus, WatchRounds)
over a shared `FederationContext` (config, stores, clock, change notifier, round state).
Plain Python on asyncio: no grpc, no protobuf; requests and answers are `rankfed.protocol`
dataclasses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from pathlib import Path

from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.controls import Controls
from rankfed.coordinator.dispatch import TaskDispatcher
from rankfed.coordinator.evaluations import Evaluations
from rankfed.coordinator.ingest import Ingest
from rankfed.coordinator.models import ClientRecord, Receipt, RoundRecord
from rankfed.coordinator.registry import ClientRegistry
from rankfed.coordinator.rounds import RoundLoop
from rankfed.coordinator.status_view import StatusView
from rankfed.coordinator.store import BLOB_DIR, STATE_FILE, BlobStore, StateStore
from rankfed.protocol import (
    Chunk,
    ClientInfo,
    ClientPage,
    DownloadRequest,
    EvaluationDownloadRequest,
    EvaluationTaskRequest,
    EvaluatorTask,
    FederationStatus,
    HeartbeatRequest,
    HeartbeatResult,
    JoinRequest,
    JoinResult,
    LeaveRequest,
    ScoreReceipt,
    ScoreReport,
    Task,
    TransferManifest,
    UploadHeader,
    UploadStatusRequest,
    UploadStatusResult,
)
from rankfed.protocol.manifest import ModelManifest

log = logging.getLogger("rankfed.coordinator")


def _archive_blobs(root: Path, dest: Path | None) -> None:
    """Move a run's adapters (global/, updates/) to `dest`, or delete them when nothing keeps
    the run's state (an in-memory store)."""
    for part in ("global", "updates"):
        source = root / part
        if not source.exists():
            continue
        if dest is None:
            shutil.rmtree(source)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest / part)


class Federation:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        blobs: BlobStore,
        manifest: ModelManifest,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = FederationContext(config, store, blobs, manifest, clock=clock)
        self.registry = ClientRegistry(self.ctx)
        self.dispatch = TaskDispatcher(self.ctx, self.registry)
        self.ingest = Ingest(self.ctx, self.dispatch)
        self.controls = Controls(self.ctx, self.registry)
        self.evaluations = Evaluations(self.ctx)
        self.rounds = RoundLoop(self.ctx, self.registry, self.dispatch, self.controls, self.evaluations)
        self.view = StatusView(self.ctx, self.registry)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def config(self) -> CoordinatorConfig:
        return self.ctx.config

    @property
    def manifest(self) -> ModelManifest:
        return self.ctx.manifest

    @property
    def store(self) -> StateStore:
        return self.ctx.store

    @property
    def federation_id(self) -> str:
        return self.registry.federation_id

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Load or create the federation's state, resume an open round, start the loops."""
        self.ctx.blobs.sweep_temporaries()
        self.registry.start()
        self.controls.load()
        await self.rounds.load_global()
        await self.rounds.resume_open_round()
        open_round = self.ctx.state.open
        self.ctx.staging.recover(open_round.round if open_round is not None else None)
        self._tasks = [
            asyncio.create_task(self.rounds.run(), name="rankfed-rounds"),
            asyncio.create_task(self.registry.watch_liveness(), name="rankfed-liveness"),
        ]
        if self.ctx.staging.enabled:
            self._tasks.append(asyncio.create_task(self.ingest.expire_staged(), name="rankfed-staging-expiry"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already logged, and reported through `fatal`
                pass
        self._tasks = []
        await self.ingest.drain()  # broken streams' bytes are kept before the writers stop
        self.ingest.close()
        self.ctx.changes.notify()

    @property
    def done(self) -> bool:
        return self.ctx.state.done

    def clients_online(self) -> int:
        """Devices seen within the heartbeat timeout (those that left or were removed are not)."""
        return self.registry.online_count()

    async def wait_done(self) -> None:
        while not self.done:
            await self.ctx.changes.wait(1.0)

    def global_adapter_exists(self, round_no: int) -> bool:
        """Whether round `round_no`'s global adapter is on disk (written and fsynced); for retention."""
        return self.ctx.globals.exists(round_no)

    @property
    def fatal(self) -> BaseException | None:
        """The exception that stopped the round loop, if one did."""
        return self.rounds.fatal

    async def wait_fatal(self) -> BaseException:
        return await self.rounds.wait_fatal()

    @property
    def on_round_closed(self) -> Callable[[RoundRecord], None] | None:
        return self.rounds.on_round_closed

    @on_round_closed.setter
    def on_round_closed(self, callback: Callable[[RoundRecord], None] | None) -> None:
        self.rounds.on_round_closed = callback

    @property
    def version(self) -> int:
        return self.ctx.changes.version

    # ------------------------------------------------------------------ EdgeService, one call per RPC

    def authenticate(self, token: str | None) -> str:
        """The client id behind a session token; AuthError for a missing, forged or expired one."""
        return self.registry.authenticate(token)

    def join(self, request: JoinRequest, *, enrolled_by_certificate: bool = False) -> JoinResult:
        return self.registry.join(request, enrolled_by_certificate=enrolled_by_certificate)

    async def get_task(self, client_id: str, max_wait_s: float) -> Task:
        return await self.dispatch.get_task(client_id, max_wait_s)

    async def open_download(
        self, client_id: str, request: DownloadRequest
    ) -> tuple[TransferManifest, AsyncGenerator[bytes, None]]:
        return await self.dispatch.open_download(client_id, request)

    async def upload(self, client_id: str, header: UploadHeader, chunks: AsyncIterable[Chunk]) -> Receipt:
        return await self.ingest.upload(client_id, header, chunks)

    async def upload_status(self, client_id: str, request: UploadStatusRequest) -> UploadStatusResult:
        return await self.ingest.upload_status(client_id, request)

    def heartbeat(self, client_id: str, request: HeartbeatRequest) -> HeartbeatResult:
        return self.registry.heartbeat(client_id, request)

    def leave(self, client_id: str, request: LeaveRequest) -> None:
        self.registry.leave(client_id, request)

    # ------------------------------------------------------------------ EvaluatorService

    async def evaluation_task(self, request: EvaluationTaskRequest) -> EvaluatorTask:
        return await self.evaluations.next_task(request)

    async def open_evaluation_download(
        self, request: EvaluationDownloadRequest
    ) -> tuple[TransferManifest, AsyncGenerator[bytes, None]]:
        return await self.evaluations.open_download(request)

    def report_scores(self, report: ScoreReport, reporter: str) -> ScoreReceipt:
        return self.evaluations.report_scores(report, reporter)

    # ------------------------------------------------------------------ AdminService

    def status(self, history_limit: int = 0, *, page_size: int = 0, page_token: str = "") -> FederationStatus:
        return self.view.status(history_limit, page_size=page_size, page_token=page_token)

    def watch(self, history_limit: int = 0) -> AsyncGenerator[FederationStatus, None]:
        return self.view.watch(history_limit)

    def list_clients(self) -> list[ClientInfo]:
        """Every registered device (for in-process use: the metrics)."""
        return self.registry.list_clients()

    def client_page(self, page_size: int = 0, page_token: str = "") -> ClientPage:
        """One page of the registered devices (ListClients)."""
        return self.registry.client_page(page_size, page_token)

    # ------------------------------------------------------------------ AdminService: operator controls

    def pause(self, operator: str, reason: str = "") -> str:
        return self.controls.pause(operator, reason)

    def resume(self, operator: str, reason: str = "") -> str:
        return self.controls.resume(operator, reason)

    def close_round(self, operator: str, reason: str = "") -> str:
        return self.controls.close_round(operator, reason)

    def stop_federation(self, operator: str, reason: str = "") -> str:
        return self.controls.stop(operator, reason)

    def remove_device(self, operator: str, device_name: str, *, ban: bool = False, reason: str = "") -> str:
        return self.controls.remove_device(operator, device_name, ban=ban, reason=reason)

    def allow_device(self, operator: str, device_name: str) -> str:
        return self.controls.allow_device(operator, device_name)

    async def new_run(self, operator: str, reason: str = "") -> str:
        """Start a new federation (a new id and an empty history) on this daemon. The old
        run is archived, not deleted: DATA_DIR/runs/<old id>/ holds its state database and
        adapters, which `rankfed coordinator export --data-dir` reads. Registered devices,
        their tokens and bans carry over: they get round 1 of the new run."""
        old_id = self.federation_id
        archive = self.ctx.blobs.root.parent / "runs" / old_id
        log.info("operator action", extra={"action": "new_run", "operator": operator, "reason": reason[:1024],
                                           "archive": str(archive)})
        await self.stop()
        async with self.ctx.state.lock:  # an update being committed finishes first
            self.ctx.staging.drop_rounds()  # kept bytes of broken uploads resume nothing in a new run
            kept = await asyncio.to_thread(self.ctx.store.snapshot, archive / STATE_FILE)
            await asyncio.to_thread(_archive_blobs, self.ctx.blobs.root, archive / BLOB_DIR if kept else None)
            self.ctx.store.reset_run()
            await asyncio.to_thread(self.ctx.store.sync)  # an operator's answer survives a power cut
        self.ctx.reset_run()
        self.evaluations.reset()
        await self.start()
        where = f"archived in {archive}" if kept else "not kept (in-memory state)"
        return f"new federation {self.federation_id} started; the previous one ({old_id}) is {where}"

    def client(self, client_id: str) -> ClientRecord:
        """The registered device behind a client id (NotFoundError if unknown)."""
        return self.ctx.require_client(client_id)
