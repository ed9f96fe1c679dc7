"""Tasks and downloads: what a device should do next (GetTask's long-poll), and the global
adapter redistributed to its rank (DownloadAdapter)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace

from rankfed.coordinator.context import OPEN_STATES, FederationContext
from rankfed.coordinator.errors import InvalidArgumentError, PreconditionError
from rankfed.coordinator.global_adapters import RankFile
from rankfed.coordinator.models import Participant
from rankfed.coordinator.registry import ClientRegistry
from rankfed.protocol import (
    Assignment,
    DoneTask,
    DownloadRequest,
    ParticipantState,
    RoundPhase,
    Task,
    TrainTask,
    TransferManifest,
    WaitTask,
)


class TaskDispatcher:
    def __init__(self, ctx: FederationContext, registry: ClientRegistry) -> None:
        self._ctx = ctx
        self._registry = registry

    # ------------------------------------------------------------------ GetTask

    async def get_task(self, client_id: str, max_wait_s: float) -> Task:
        ctx = self._ctx
        wait = min(max(max_wait_s, 0.0), ctx.config.server.long_poll_seconds)
        deadline = ctx.clock() + wait
        with self._registry.polling(client_id):
            while True:
                task = self._task_for(client_id)
                if task is not None:
                    return task
                remaining = deadline - ctx.clock()
                if remaining <= 0:
                    return WaitTask(retry_after_s=0.0, reason=self._wait_reason())
                await ctx.changes.wait_task(client_id, remaining)  # a task changes only with the round's phase

    def _task_for(self, client_id: str) -> Task | None:
        ctx, state = self._ctx, self._ctx.state
        if state.done:
            final = ctx.store.latest_round()
            return DoneTask(
                final_round=state.global_round,
                reason=f"federation finished after {final.round if final else 0} rounds",
                final_adapter_sha256=self.global_sha256(),
            )
        record = state.open
        if record is None or record.phase is not RoundPhase.TRAINING or client_id not in state.participants:
            return None
        part = ctx.store.get_participant(record.round, client_id)
        if part is None or part.state not in (*OPEN_STATES, ParticipantState.DROPPED):
            return None
        lora = ctx.lora_for_rank(part.rank, alpha=part.alpha)
        rank_file = ctx.globals.rank_file(
            state.global_round, state.current_global(), rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora
        )
        fed = ctx.config.federation
        client = ctx.store.get_client(client_id)
        return TrainTask(
            round=record.round,
            assignment=Assignment(lora=lora, tier=client.tier if client else "", reason=state.reasons.get(client_id, "")),
            local_steps=fed.local_steps,
            learning_rate=fed.learning_rate,
            batch_size=fed.batch_size,
            deadline=record.deadline,
            method=record.method,
            adapter_bytes=rank_file.size,
            adapter_sha256=rank_file.sha256,
            seed=fed.seed * 1_000_003 + record.round,
        )

    def _wait_reason(self) -> str:
        if self._ctx.state.paused:
            return "the operator paused the federation; wait"
        record = self._ctx.state.open
        if record is None:
            online = self._registry.online_count()
            return f"waiting for clients: {online} online, round starts at {self._ctx.config.federation.min_clients}"
        return f"round {record.round} is {record.phase.value}; this client is not a participant"

    def global_sha256(self) -> str:
        ctx, state = self._ctx, self._ctx.state
        if state.global_sha is None or state.global_sha[0] != state.global_round:
            record = ctx.store.get_round(state.global_round)
            sha = record.global_sha256 if record and record.global_sha256 else ctx.globals.sha256(state.global_round)
            state.global_sha = (state.global_round, sha)
        return state.global_sha[1]

    async def prepare_rank_files(self, participants: list[Participant]) -> None:
        """Redistribute and encode the global adapter once per (rank, alpha), in a thread,
        so that GetTask and DownloadAdapter never block the event loop on it."""
        ctx, state = self._ctx, self._ctx.state
        for rank, alpha in sorted({(p.rank, p.alpha) for p in participants}):
            lora = ctx.lora_for_rank(rank, alpha=alpha)
            await asyncio.to_thread(
                ctx.globals.rank_file, state.global_round, state.current_global(),
                rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora,
            )

    # ------------------------------------------------------------------ DownloadAdapter

    async def open_download(
        self, client_id: str, request: DownloadRequest
    ) -> tuple[TransferManifest, AsyncGenerator[bytes, None]]:
        """The manifest of a client's global adapter and an iterator over its chunks from `offset`.

        round 0: the latest global adapter at the client's current rank, or with `full` the
        global adapter itself (what a device merges and exports at the end); otherwise the
        open round's global adapter at the rank the client was assigned for it."""
        ctx, state = self._ctx, self._ctx.state
        round_no, offset, full = request.round, request.offset, request.full
        if full and round_no != 0:
            raise InvalidArgumentError("full downloads are of the latest global adapter: send round 0")
        part: Participant | None = None
        if round_no == 0:
            client = ctx.require_client(client_id)
            if full:
                rank = state.current_global().max_rank
                # The global adapter keeps scaling 1 (alpha = r): see rankfed.aggregation.
                lora = replace(ctx.lora_for_rank(rank), alpha=float(rank), use_rslora=False)
            else:
                lora = ctx.lora_for_rank(client.rank)
        else:
            part = self.training_participant(client_id, round_no, action="download")
            lora = ctx.lora_for_rank(part.rank, alpha=part.alpha)
        if full:
            relpath = ctx.globals.relpath(state.global_round)
            rank_file = RankFile(relpath=relpath, size=ctx.blobs.path(relpath).stat().st_size,
                                 sha256=self.global_sha256())
        else:
            rank_file = await asyncio.to_thread(
                ctx.globals.rank_file, state.global_round, state.current_global(),
                rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora,
            )
        if offset > rank_file.size:
            raise InvalidArgumentError(f"download offset {offset} is past the end of the {rank_file.size}-byte adapter")
        chunk = ctx.config.server.max_chunk_bytes
        manifest = TransferManifest(
            round=round_no or state.global_round, rank=lora.rank, total_bytes=rank_file.size,
            sha256=rank_file.sha256, chunk_bytes=chunk, lora=lora,
        )
        if part is not None and part.state is ParticipantState.ASSIGNED:
            ctx.store.put_participant(replace(part, state=ParticipantState.DOWNLOADING))
            ctx.changes.notify()

        async def chunks() -> AsyncGenerator[bytes, None]:
            sent = 0
            with ctx.globals.open(rank_file.relpath) as fh:
                fh.seek(offset)
                while data := fh.read(chunk):
                    sent += len(data)
                    yield data
            if part is not None:
                self._download_finished(client_id, round_no, sent)

        return manifest, chunks()

    def _download_finished(self, client_id: str, round_no: int, sent: int) -> None:
        ctx = self._ctx
        part = ctx.store.get_participant(round_no, client_id)
        if part is None or ctx.state.open is None or ctx.state.open.round != round_no:
            return
        revived = (ParticipantState.ASSIGNED, ParticipantState.DOWNLOADING, ParticipantState.DROPPED)
        state = ParticipantState.TRAINING if part.state in revived else part.state
        ctx.store.put_participant(replace(part, state=state, bytes_down=part.bytes_down + sent))
        ctx.changes.notify()

    def training_participant(self, client_id: str, round_no: int, *, action: str) -> Participant:
        """This client's part in the open round; PreconditionError when the round is not
        open for `action` (stale, future, closed) or the client is not in it."""
        ctx = self._ctx
        record = ctx.state.open
        if record is None or record.phase is not RoundPhase.TRAINING:
            latest = ctx.store.latest_round()
            if latest is not None and round_no < latest.round:
                raise PreconditionError(
                    f"{action} names stale round {round_no}; round {latest.round} is {latest.phase.value}: "
                    "ask GetTask for a new task"
                )
            raise PreconditionError(
                f"no round is open for {action} (latest round {latest.round if latest else 0} is "
                f"{latest.phase.value if latest else 'not started'}); ask GetTask for a new task"
            )
        if round_no != record.round:
            word = "stale" if round_no < record.round else "future"
            raise PreconditionError(f"{action} names {word} round {round_no}; the open round is {record.round}")
        part = ctx.store.get_participant(round_no, client_id)
        if part is None:
            raise PreconditionError(f"this client was not selected for round {round_no}; wait for a task")
        return part
