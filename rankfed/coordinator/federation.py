"""The federation: clients, rounds, transfers and status. Plain Python on asyncio; the
servicers are thin wrappers around the public coroutines and methods here.

A round goes WAITING_FOR_CLIENTS -> TRAINING -> AGGREGATING -> DONE (or FAILED when fewer
than min_clients updates arrive by the deadline). Every accepted update is fsynced and its
receipt committed before it is acknowledged, and folded into the round's accumulator at
once; after a crash the open round is rebuilt from the receipts on disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import numpy as np

from rankfed.aggregation import Accumulator, Adapter, AdapterError, AggregationError, get_method
from rankfed.coordinator import rank_policy
from rankfed.coordinator.auth import EDGE_AUDIENCE, TokenSigner
from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.errors import (
    AuthError,
    ConfigError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    StorageError,
)
from rankfed.coordinator.global_adapters import GlobalAdapters, RankFile
from rankfed.coordinator.manifest import ModelManifest
from rankfed.coordinator.models import (
    Assignment,
    ClientRecord,
    DoneTask,
    FederationView,
    HeartbeatResult,
    JoinInfo,
    JoinResult,
    LoraSettings,
    Participant,
    ParticipantState,
    ParticipantView,
    Receipt,
    RoundPhase,
    RoundRecord,
    RoundView,
    Task,
    TrainTask,
    TransferManifest,
    UploadHeader,
    WaitTask,
)
from rankfed.coordinator.store import BlobStore, StateStore
from rankfed.coordinator.store.blobs import round_dir
from rankfed.coordinator.ingest import Chunks, Ingest, RoundHooks
from rankfed.coordinator.uploads import UploadSession

log = logging.getLogger("rankfed.coordinator")

_OPEN_STATES = (ParticipantState.ASSIGNED, ParticipantState.DOWNLOADING, ParticipantState.TRAINING, ParticipantState.UPLOADING)


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
        self.config = config
        self.manifest = manifest
        self._store = store
        self._blobs = blobs
        self._clock = clock
        _check_manifest_for_mode(manifest, config)
        self._personalized = config.federation.mode == "personalized"
        self._method = get_method(config.federation.method)
        # Rules that average A and B as they are need every client at the same rank.
        self._homogeneous = self._personalized or self._method.name == "fedit"
        self._spec = manifest.adapter_spec()
        self._globals = GlobalAdapters(blobs, manifest, self._method, seed=config.federation.seed)
        self._last_seen: dict[str, float] = {}
        self._uploading: dict[str, UploadSession] = {}  # open upload streams by client (ingest's)
        self._polling: dict[str, int] = {}  # clients inside a GetTask long-poll: they are alive
        self._event = asyncio.Event()
        self._task_event = asyncio.Event()  # set when a long-poll's answer may have changed
        self._task_phase: tuple[object, ...] = ()
        self._version = 0
        self._round_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._open: RoundRecord | None = None
        self._accumulator = None
        self._global: Adapter | None = None
        self._global_round = 0
        self._global_sha: tuple[int, str] | None = None
        self._reasons: dict[str, str] = {}
        self._fold_failures: list[str] = []
        self.fatal: BaseException | None = None
        self._done = False
        self.federation_id = ""
        self._signer: TokenSigner | None = None
        # Called with each closed round's record (DONE or FAILED); the metrics use it.
        self.on_round_closed: Callable[[RoundRecord], None] | None = None
        self._ingest = Ingest(
            server=config.server, store=store, blobs=blobs, spec=self._spec, homogeneous=self._homogeneous,
            uploading=self._uploading, hooks=RoundHooks(
                round_lock=self._round_lock,
                participant=lambda cid, round_no: self._training_participant(cid, round_no, action="upload"),
                accumulator=lambda: self._accumulator,
                client=self._require_client,
                fold_failed=lambda reason: self._fold_failures.append(reason),
                notify=self._notify,
                clock=lambda: self._clock(),
            ),
        )

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Load or create the federation's state, resume an open round, start the loops."""
        self._blobs.sweep_temporaries()
        self.federation_id = self._meta_or_create("federation_id", lambda: "fed-" + secrets.token_hex(6))
        self._signer = TokenSigner(bytes.fromhex(self._meta_or_create("token_key", lambda: TokenSigner.new_key().hex())))
        now = self._clock()
        for client in self._store.list_clients():
            if not client.left:
                # After a restart every known device gets one heartbeat timeout to show up.
                self._last_seen[client.client_id] = now
        await self._load_global()
        await self._resume_open_round()
        self._tasks = [
            asyncio.create_task(self._run_rounds(), name="rankfed-rounds"),
            asyncio.create_task(self._watch_liveness(), name="rankfed-liveness"),
        ]

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
        self._ingest.close()
        self._notify()

    @property
    def done(self) -> bool:
        return self._done

    async def wait_done(self) -> None:
        while not self._done:
            await self._wait_change(1.0)

    def _meta_or_create(self, key: str, make: Callable[[], str]) -> str:
        value = self._store.get_meta(key)
        if value is None:
            value = make()
            self._store.set_meta(key, value)
        return value

    async def _load_global(self) -> None:
        done = [r for r in self._store.list_rounds() if r.phase is RoundPhase.DONE]
        if done:
            self._global_round = done[-1].round
            self._global = await asyncio.to_thread(self._globals.load, self._global_round)
            return
        if self._globals.exists(0):
            self._global = await asyncio.to_thread(self._globals.load, 0)
            self._global_sha = (0, await asyncio.to_thread(self._globals.sha256, 0))
        else:
            lora = self._lora_for_rank(self.config.lora.max_rank)
            self._global = self._spec.init_adapter(
                rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora, seed=self.config.federation.seed
            )
            self._global_sha = (0, await asyncio.to_thread(self._globals.save, 0, self._global))
        self._global_round = 0

    async def _resume_open_round(self) -> None:
        latest = self._store.latest_round()
        if latest is None or latest.phase in (RoundPhase.DONE, RoundPhase.FAILED):
            self._done = latest is not None and latest.round >= self.config.federation.rounds
            return
        if latest.phase is RoundPhase.WAITING_FOR_CLIENTS:
            return  # nothing was assigned yet: the loop starts this round afresh
        # TRAINING or AGGREGATING: rebuild the accumulator from the acknowledged updates.
        accumulator = self._new_accumulator()
        receipts = self._store.list_receipts(latest.round)
        # A crash between an update's fsync and its receipt leaves a file nobody acknowledged.
        acknowledged = {r.blob_path for r in receipts}
        for relpath in self._blobs.list_blobs(f"updates/{round_dir(latest.round)}"):
            if relpath not in acknowledged:
                self._blobs.delete(relpath)
        for receipt in receipts:
            adapter = await asyncio.to_thread(self._load_update, receipt)
            await asyncio.to_thread(accumulator.fold, adapter, float(receipt.num_examples))
        now = self._clock()
        # The devices could not reach us while we were down: give them time to come back.
        grace = self.config.federation.heartbeat_timeout_seconds + self.config.federation.straggler_grace_seconds
        record = replace(latest, phase=RoundPhase.TRAINING, deadline=max(latest.deadline, now + grace))
        self._store.put_round(record)
        await self._prepare_rank_files(self._store.list_participants(record.round))
        self._open, self._accumulator = record, accumulator
        log.info(
            "resumed round",
            extra={"round": record.round, "updates": len(receipts), "deadline_in": round(record.deadline - now, 1)},
        )

    def _load_update(self, receipt: Receipt) -> Adapter:
        from rankfed.aggregation import decode_adapter

        return decode_adapter(self._blobs.read_bytes(receipt.blob_path), spec=self._spec)

    # ------------------------------------------------------------------ change notification

    def _notify(self) -> None:
        self._version += 1
        self._event.set()
        self._event = asyncio.Event()
        # Long-polls wake only when what GetTask can answer changed (a round was published or
        # closed, the federation finished), not on every join, heartbeat or chunk: with
        # 10,000 devices polling, waking all of them per change is the whole event loop.
        phase = (self._done, self._open.round if self._open else 0, self._open.phase if self._open else None)
        if phase != self._task_phase:
            self._task_phase = phase
            self._task_event.set()
            self._task_event = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            pass

    @property
    def version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ clients

    def authenticate(self, token: str | None) -> str:
        """The client id behind a session token; AuthError for a missing, forged or expired one."""
        if not token:
            raise AuthError("missing session token: send 'authorization: Bearer <token>' from Join")
        assert self._signer is not None, "start() first"
        claims = self._signer.verify(token, audience=EDGE_AUDIENCE, now=self._clock())
        client = self._store.get_client(claims.client_id)
        if client is None:
            raise AuthError("session token names an unknown client; join again")
        if client.left:
            raise AuthError("this client left the federation; join again to come back")
        self._touch(client.client_id)
        return client.client_id

    def _touch(self, client_id: str) -> None:
        was_online = client_id in self._last_seen
        self._last_seen[client_id] = self._clock()
        if not was_online:
            self._notify()

    def join(self, info: JoinInfo, *, enrolled_by_certificate: bool = False) -> JoinResult:
        """Register (or re-register) a device. `enrolled_by_certificate`: the transport
        verified the device's client certificate (mutual TLS), which replaces the secret."""
        cfg = self.config
        if (cfg.server.enrollment_secret and not enrolled_by_certificate
                and not secrets.compare_digest(info.enrollment_secret, cfg.server.enrollment_secret)):
            raise PermissionDeniedError("enrollment secret is wrong; ask the operator for the federation's secret")
        name = info.device_name.strip()
        if not name or len(name) > 128:
            raise InvalidArgumentError("device_name must be 1 to 128 characters; use a stable name per device")
        _check_capability(info)
        model = self.manifest.model_for(info.base_model_sha256)
        if model is None:
            allowed = ", ".join(f"{m.model_id} with sha256 {m.weights_sha256[:16]}…" for m in self.manifest.allowed_models())
            raise PreconditionError(
                f"this device's base model has weights sha256 {info.base_model_sha256[:16] or '(none)'}…, the federation "
                f"trains {allowed}; install {'one of those models' if len(self.manifest.allowed_models()) > 1 else 'that model'}"
            )
        now = self._clock()
        existing = self._store.find_client_by_name(name)
        demotions = 0 if existing is None else rank_policy.demotions_for(
            existing.deadlines_missed, cfg.federation.demote_after_missed_deadlines
        )
        rank, tier, reason = rank_policy.assign(
            info.capability, cfg.rank_policy, max_rank=cfg.lora.max_rank, demotions=demotions
        )
        if self._personalized:
            rank, reason = cfg.lora.max_rank, _SHARED_REASON.format(rank=cfg.lora.max_rank)
        if existing is None:
            client = ClientRecord(
                client_id="c-" + secrets.token_hex(6),
                device_name=name,
                capability=info.capability,
                num_examples=info.num_examples,
                joined_at=now,
                last_seen_at=now,
                rank=rank,
                tier=tier,
            )
        else:
            client = replace(
                existing, capability=info.capability, num_examples=info.num_examples, last_seen_at=now,
                rank=rank, tier=tier, online=True, left=False,
            )
        self._store.upsert_client(client)
        assert self._signer is not None, "start() first"
        token, expires = self._signer.issue(
            client.client_id, audience=EDGE_AUDIENCE, ttl_seconds=cfg.server.token_ttl_seconds, now=now
        )
        self._touch(client.client_id)
        self._notify()
        log.info("client joined", extra={"client_id": client.client_id, "device": name, "rank": rank, "tier": tier})
        return JoinResult(
            client_id=client.client_id,
            session_token=token,
            token_expires_at=expires,
            assignment=Assignment(lora=self._lora_for_rank(rank), tier=tier, reason=reason),
            heartbeat_interval=cfg.federation.heartbeat_interval_seconds,
            federation_id=self.federation_id,
            max_chunk_bytes=cfg.server.max_chunk_bytes,
            mode=cfg.federation.mode,
            base_model_id=model.model_id,
            base_model_sha256=model.weights_sha256,
        )

    def leave(self, client_id: str, reason: str) -> None:
        client = self._require_client(client_id)
        self._store.upsert_client(replace(client, left=True, online=False))
        self._last_seen.pop(client_id, None)
        self._mark_gone(client_id, ParticipantState.DROPPED)
        log.info("client left", extra={"client_id": client_id, "reason": reason[:200]})
        self._notify()

    def heartbeat(self, client_id: str, round_no: int, state: ParticipantState | None, progress: float) -> HeartbeatResult:
        round_open = self._open is not None and self._open.round == round_no and self._open.phase is RoundPhase.TRAINING
        if round_open and state in (ParticipantState.TRAINING, ParticipantState.UPLOADING):
            part = self._store.get_participant(round_no, client_id)
            if part is not None and part.state in (ParticipantState.TRAINING, ParticipantState.UPLOADING, ParticipantState.DROPPED):
                if part.state is not state:
                    self._store.put_participant(replace(part, state=state))
                    self._notify()
        return HeartbeatResult(next_in=self.config.federation.heartbeat_interval_seconds, round_open=round_open)

    def list_clients(self) -> list[tuple[ClientRecord, bool]]:
        return [(c, c.client_id in self._last_seen) for c in self._store.list_clients()]

    def client(self, client_id: str) -> ClientRecord:
        """The registered device behind a client id (NotFoundError if unknown)."""
        return self._require_client(client_id)

    def _require_client(self, client_id: str) -> ClientRecord:
        client = self._store.get_client(client_id)
        if client is None:
            raise NotFoundError(f"unknown client {client_id}")
        return client

    def _online_ids(self) -> list[str]:
        return sorted(self._last_seen)

    async def _watch_liveness(self) -> None:
        timeout = self.config.federation.heartbeat_timeout_seconds
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = self._clock()
            for client_id, seen in list(self._last_seen.items()):
                if now - seen > timeout and client_id not in self._uploading and client_id not in self._polling:
                    del self._last_seen[client_id]
                    self._mark_gone(client_id, ParticipantState.DROPPED)
                    log.info("client dropped", extra={"client_id": client_id, "silent_for": round(now - seen, 1)})
                    self._notify()

    def _mark_gone(self, client_id: str, state: ParticipantState) -> None:
        if self._open is None:
            return
        part = self._store.get_participant(self._open.round, client_id)
        if part is not None and part.state in _OPEN_STATES:
            self._store.put_participant(replace(part, state=state))

    # ------------------------------------------------------------------ tasks

    async def get_task(self, client_id: str, max_wait: float) -> Task:
        wait = min(max(max_wait, 0.0), self.config.server.long_poll_seconds)
        deadline = self._clock() + wait
        self._polling[client_id] = self._polling.get(client_id, 0) + 1
        try:
            while True:
                task = self._task_for(client_id)
                if task is not None:
                    return task
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return WaitTask(retry_after=0.0, reason=self._wait_reason())
                event = self._task_event
                try:
                    await asyncio.wait_for(event.wait(), timeout=remaining)
                except TimeoutError:
                    pass
        finally:
            self._polling[client_id] -= 1
            if not self._polling[client_id]:
                del self._polling[client_id]
            self._touch(client_id)  # a long-poll is a sign of life until its very end

    def _task_for(self, client_id: str) -> Task | None:
        if self._done:
            final = self._store.latest_round()
            return DoneTask(
                final_round=self._global_round,
                reason=f"federation finished after {final.round if final else 0} rounds",
                final_adapter_sha256=self._global_sha256(),
            )
        record = self._open
        if record is None or record.phase is not RoundPhase.TRAINING:
            return None
        part = self._store.get_participant(record.round, client_id)
        if part is None or part.state not in (*_OPEN_STATES, ParticipantState.DROPPED):
            return None
        lora = self._lora_for_rank(part.rank, alpha=part.alpha)
        rank_file = self._globals.rank_file(
            self._global_round, self._current_global(), rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora
        )
        fed = self.config.federation
        client = self._store.get_client(client_id)
        return TrainTask(
            round=record.round,
            assignment=Assignment(
                lora=lora, tier=client.tier if client else "", reason=self._reasons.get(client_id, "")
            ),
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
        if self._open is None:
            online = len(self._last_seen)
            return f"waiting for clients: {online} online, round starts at {self.config.federation.min_clients}"
        return f"round {self._open.round} is {self._open.phase.value}; this client is not a participant"

    def _global_sha256(self) -> str:
        if self._global_sha is None or self._global_sha[0] != self._global_round:
            record = self._store.get_round(self._global_round)
            sha = record.global_sha256 if record and record.global_sha256 else self._globals.sha256(self._global_round)
            self._global_sha = (self._global_round, sha)
        return self._global_sha[1]

    def _current_global(self) -> Adapter:
        assert self._global is not None
        return self._global

    def _lora_for_rank(self, rank: int, *, alpha: float | None = None) -> LoraSettings:
        settings = rank_policy.lora_settings(
            rank,
            self.config.lora,
            target_modules=tuple(self.manifest.target_modules),
            modules_to_save=tuple(self.manifest.modules_to_save),
        )
        return settings if alpha is None else replace(settings, alpha=alpha)

    # ------------------------------------------------------------------ downloads

    async def open_download(
        self, client_id: str, round_no: int, offset: int, *, full: bool = False
    ) -> tuple[TransferManifest, AsyncIterator[bytes]]:
        """The manifest of a client's global adapter and an iterator over its chunks from `offset`.

        round 0: the latest global adapter at the client's current rank, or with `full` the
        global adapter itself (what a device merges and exports at the end); otherwise the
        open round's global adapter at the rank the client was assigned for it."""
        if full and round_no != 0:
            raise InvalidArgumentError("full downloads are of the latest global adapter: send round 0")
        if round_no == 0:
            client = self._require_client(client_id)
            part = None
            if full:
                global_adapter = self._current_global()
                rank = global_adapter.max_rank
                # The global adapter keeps scaling 1 (alpha = r): see rankfed.aggregation.
                lora = replace(self._lora_for_rank(rank), alpha=float(rank), use_rslora=False)
            else:
                lora = self._lora_for_rank(client.rank)
        else:
            part = self._training_participant(client_id, round_no, action="download")
            lora = self._lora_for_rank(part.rank, alpha=part.alpha)
        if full:
            relpath = self._globals.relpath(self._global_round)
            rank_file = RankFile(relpath=relpath, size=self._blobs.path(relpath).stat().st_size,
                                 sha256=self._global_sha256())
        else:
            rank_file = await asyncio.to_thread(
                self._globals.rank_file, self._global_round, self._current_global(),
                rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora,
            )
        if offset > rank_file.size:
            raise InvalidArgumentError(f"download offset {offset} is past the end of the {rank_file.size}-byte adapter")
        chunk = self.config.server.max_chunk_bytes
        manifest = TransferManifest(
            round=round_no or self._global_round, rank=lora.rank, total_bytes=rank_file.size,
            sha256=rank_file.sha256, chunk_bytes=chunk, lora=lora,
        )
        if part is not None and part.state is ParticipantState.ASSIGNED:
            self._store.put_participant(replace(part, state=ParticipantState.DOWNLOADING))
            self._notify()

        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            with self._globals.open(rank_file.relpath) as fh:
                fh.seek(offset)
                while data := fh.read(chunk):
                    sent += len(data)
                    yield data
            if part is not None:
                self._download_finished(client_id, round_no, sent)

        return manifest, chunks()

    def _download_finished(self, client_id: str, round_no: int, sent: int) -> None:
        part = self._store.get_participant(round_no, client_id)
        if part is None or self._open is None or self._open.round != round_no:
            return
        revived = (ParticipantState.ASSIGNED, ParticipantState.DOWNLOADING, ParticipantState.DROPPED)
        state = ParticipantState.TRAINING if part.state in revived else part.state
        self._store.put_participant(replace(part, state=state, bytes_down=part.bytes_down + sent))
        self._notify()

    def _training_participant(self, client_id: str, round_no: int, *, action: str) -> Participant:
        record = self._open
        if record is None or record.phase is not RoundPhase.TRAINING:
            latest = self._store.latest_round()
            raise PreconditionError(
                f"no round is open for {action} (latest round {latest.round if latest else 0} is "
                f"{latest.phase.value if latest else 'not started'}); ask GetTask for a new task"
            )
        if round_no != record.round:
            word = "stale" if round_no < record.round else "future"
            raise PreconditionError(f"{action} names {word} round {round_no}; the open round is {record.round}")
        part = self._store.get_participant(round_no, client_id)
        if part is None:
            raise PreconditionError(f"this client was not selected for round {round_no}; wait for a task")
        return part

    # ------------------------------------------------------------------ uploads

    async def upload(self, client_id: str, header: UploadHeader, chunks: Chunks) -> Receipt:
        """One update from header to receipt: the whole UploadUpdate call (see ingest)."""
        return await self._ingest.upload(client_id, header, chunks)

    # ------------------------------------------------------------------ rounds

    def _new_accumulator(self) -> Accumulator:
        return self._method.accumulator(self._spec, global_rank=self.config.lora.max_rank, previous=self._global)

    def _next_round_number(self) -> int:
        latest = self._store.latest_round()
        if latest is None:
            return 1
        return latest.round if latest.phase is RoundPhase.WAITING_FOR_CLIENTS else latest.round + 1

    async def _run_rounds(self) -> None:
        try:
            while True:
                if self._open is None:
                    round_no = self._next_round_number()
                    if round_no > self.config.federation.rounds:
                        self._done = True
                        log.info("federation done", extra={"rounds": round_no - 1, "global_round": self._global_round})
                        self._notify()
                        return
                    await self._start_round(round_no)
                await self._wait_round_end()
                await self._close_round()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("round loop crashed")
            self.fatal = exc  # the server sees it, turns health NOT_SERVING and exits non-zero
            self._notify()
            raise

    async def wait_fatal(self) -> BaseException:
        """Return the exception that stopped the round loop (waits until one does)."""
        while self.fatal is None:
            await self._wait_change(1.0)
        return self.fatal

    async def _start_round(self, round_no: int) -> None:
        fed = self.config.federation
        now = self._clock()
        waiting = RoundRecord(
            round=round_no, phase=RoundPhase.WAITING_FOR_CLIENTS, method=fed.method, started_at=now,
            deadline=0.0, min_clients=fed.min_clients, global_rank=self.config.lora.max_rank,
        )
        self._store.put_round(waiting)
        self._notify()
        enough_since: float | None = None
        while True:
            online = self._online_ids()
            now = self._clock()
            if len(online) >= fed.min_clients:
                enough_since = now if enough_since is None else enough_since
                active = [c for c in self._store.list_clients() if not c.left]
                target = fed.clients_per_round or len(active)
                if len(online) >= target or now - enough_since >= fed.wait_for_clients_seconds:
                    break
            else:
                enough_since = None
            await self._wait_change(0.5)
        rng = random.Random(fed.seed * 1_000_003 + round_no)
        chosen = online
        if fed.clients_per_round and len(online) > fed.clients_per_round:
            # Sampled in device-name order (client ids are random tokens), so a seed picks the
            # same devices in every run of the same federation.
            names = {cid: self._require_client(cid).device_name for cid in online}
            by_name = sorted(online, key=lambda cid: (names[cid], cid))
            chosen = sorted(rng.sample(by_name, fed.clients_per_round))
        participants = self._assign(round_no, chosen)
        record = replace(waiting, phase=RoundPhase.TRAINING, started_at=now, deadline=now + fed.round_deadline_seconds)
        with self._store.transaction():
            for part in participants:
                self._store.put_participant(part)
            self._store.put_round(record)
        # Before the round is published: GetTask must never wait for an SVD or an fsync.
        await self._prepare_rank_files(participants)
        self._open, self._accumulator = record, self._new_accumulator()
        log.info("round started", extra={
            "round": round_no, "participants": len(participants), "ranks": sorted(p.rank for p in participants),
        })
        self._notify()

    async def _prepare_rank_files(self, participants: list[Participant]) -> None:
        """Redistribute and encode the global adapter once per (rank, alpha), in a thread,
        so that GetTask and DownloadAdapter never block the event loop on it."""
        for rank, alpha in sorted({(p.rank, p.alpha) for p in participants}):
            lora = self._lora_for_rank(rank, alpha=alpha)
            await asyncio.to_thread(
                self._globals.rank_file, self._global_round, self._current_global(),
                rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora,
            )

    def _assign(self, round_no: int, client_ids: list[str]) -> list[Participant]:
        cfg = self.config
        clients = {cid: self._require_client(cid) for cid in client_ids}
        ranks: dict[str, int] = {}
        tiers: dict[str, tuple[str, str]] = {}
        for cid, client in clients.items():
            demotions = rank_policy.demotions_for(client.deadlines_missed, cfg.federation.demote_after_missed_deadlines)
            rank, tier, reason = rank_policy.assign(client.capability, cfg.rank_policy, max_rank=cfg.lora.max_rank, demotions=demotions)
            if self._method.name == "hetlora":
                # HetLoRA's self-pruning sticks: a client that uploaded fewer components than it
                # was given keeps that smaller rank (r_k <- floor(gamma r_k) in the paper).
                last = self._store.get_receipt(round_no - 1, cid) if round_no > 1 else None
                if last is not None and last.rank < rank:
                    rank, reason = last.rank, f"{reason}; self-pruned to rank {last.rank} in round {round_no - 1}"
            ranks[cid], tiers[cid] = rank, (tier, reason)
        if self._homogeneous:
            # FedIT (and pFedLoRA's shared adapter) average A and B directly, which needs one
            # rank for everyone: lora.max_rank, halved for all alike to fit a round budget.
            rank = cfg.lora.max_rank
            why = (_SHARED_REASON.format(rank=rank) if self._personalized
                   else f"fedit is homogeneous: every client trains at lora.max_rank {rank}")
            budget = 0 if self._personalized else cfg.rank_policy.round_budget_bytes
            while budget and rank > 1 and len(ranks) * rank_policy.update_bytes(rank, self.manifest) > budget:
                rank //= 2
            if rank != cfg.lora.max_rank:
                why += f"; lowered to {rank} for every client to fit the round budget of {budget} bytes"
            ranks = dict.fromkeys(ranks, rank)
            tiers = {cid: (tier, why) for cid, (tier, _) in tiers.items()}
        elif cfg.rank_policy.round_budget_bytes:
            budgeted = rank_policy.apply_budget(
                ranks,
                bytes_at_rank=lambda r: rank_policy.update_bytes(r, self.manifest),
                budget_bytes=cfg.rank_policy.round_budget_bytes,
            )
            for cid, (old, new) in rank_policy.lowered_ranks(ranks, budgeted).items():
                tier, reason = tiers[cid]
                tiers[cid] = (tier, f"{reason}; lowered {old} -> {new} to fit the round budget of "
                              f"{cfg.rank_policy.round_budget_bytes} bytes")
            ranks = budgeted
        self._reasons = {cid: reason for cid, (_, reason) in tiers.items()}
        parts = []
        for cid in client_ids:
            lora = self._lora_for_rank(ranks[cid])
            client = clients[cid]
            if client.rank != ranks[cid] or client.tier != tiers[cid][0]:
                self._store.upsert_client(replace(client, rank=ranks[cid], tier=tiers[cid][0]))
            parts.append(Participant(
                round=round_no, client_id=cid, rank=lora.rank, alpha=lora.alpha,
                state=ParticipantState.ASSIGNED, num_examples=client.num_examples,
            ))
        return parts

    async def _wait_round_end(self) -> None:
        fed = self.config.federation
        quorum_since: float | None = None
        while True:
            record = self._open
            assert record is not None
            parts = self._store.list_participants(record.round)
            uploaded = sum(p.state is ParticipantState.UPLOADED for p in parts)
            pending = [p for p in parts if p.state in _OPEN_STATES or p.client_id in self._uploading]
            now = self._clock()
            if not pending or now >= record.deadline:
                return
            if uploaded >= fed.min_clients:
                quorum_since = now if quorum_since is None else quorum_since
                if now - quorum_since >= fed.straggler_grace_seconds:
                    return
            wake = record.deadline - now
            if quorum_since is not None:
                wake = min(wake, quorum_since + fed.straggler_grace_seconds - now)
            await self._wait_change(min(wake, 1.0))
            # Every join and heartbeat notifies; re-reading the round's participants after each
            # one took most of the event loop with 10,000 devices joining (bench/load_bench.py):
            # look again at most every _ROUND_END_POLL seconds.
            await asyncio.sleep(_ROUND_END_POLL)

    async def _close_round(self) -> None:
        fed = self.config.federation
        async with self._round_lock:
            record = self._open
            assert record is not None
            record = replace(record, phase=RoundPhase.AGGREGATING)
            self._open = record
            self._store.put_round(record)
            self._notify()
            parts = self._store.list_participants(record.round)
            with self._store.transaction():
                for part in parts:
                    if part.state in _OPEN_STATES:
                        self._store.put_participant(replace(part, state=ParticipantState.LATE))
                    if part.state is not ParticipantState.UPLOADED:
                        client = self._store.get_client(part.client_id)
                        if client is not None:
                            self._store.upsert_client(replace(client, deadlines_missed=client.deadlines_missed + 1))
            receipts = self._store.list_receipts(record.round)
            metrics = _round_metrics(receipts, self._store.list_participants(record.round))
            if self._personalized:
                metrics.update(_personal_metrics(receipts))
            now = self._clock()
            if len(receipts) < fed.min_clients:
                reason = f"quorum not reached: {len(receipts)} of {fed.min_clients} required updates by the deadline"
                record = replace(record, phase=RoundPhase.FAILED, finished_at=now, metrics=metrics, failure_reason=reason)
                log.warning("round failed", extra={"round": record.round, "reason": reason})
            else:
                started = time.perf_counter()
                accumulator, self._accumulator = self._accumulator, None
                try:
                    if accumulator is None or self._fold_failures:
                        raise AggregationError(f"updates could not be folded: {'; '.join(self._fold_failures)}")
                    result = await asyncio.to_thread(accumulator.result)
                    del accumulator  # its sums are as large as the global adapter: free them before encoding
                    sha = await asyncio.to_thread(self._globals.save, record.round, result)
                except (AggregationError, AdapterError, StorageError) as exc:
                    # e.g. an aggregate that overflows float32, or a full disk: the round fails,
                    # the previous global adapter stays, and the federation goes on.
                    reason = f"aggregation failed: {exc}; kept the previous global adapter"
                    record = replace(record, phase=RoundPhase.FAILED, finished_at=now, metrics=metrics, failure_reason=reason)
                    log.error("round failed", extra={"round": record.round, "reason": reason})
                else:
                    metrics["aggregation_seconds"] = time.perf_counter() - started
                    self._global, self._global_round = result, record.round
                    record = replace(
                        record, phase=RoundPhase.DONE, finished_at=self._clock(), metrics=metrics,
                        global_sha256=sha, global_rank=result.max_rank,
                    )
                    log.info("round done", extra={"round": record.round, "updates": len(receipts), "metrics": metrics})
            self._store.put_round(record)
            self._open, self._accumulator = None, None
            self._fold_failures = []
            self._uploading.clear()
            self._done = record.round >= fed.rounds
            self._notify()
        if self.on_round_closed is not None:
            self.on_round_closed(record)

    # ------------------------------------------------------------------ status

    def status(self, history_limit: int = 0) -> FederationView:
        rounds = self._store.list_rounds()
        finished = [r for r in rounds if r.phase in (RoundPhase.DONE, RoundPhase.FAILED)]
        if history_limit:
            finished = finished[-history_limit:]
        current = rounds[-1] if rounds else None
        return FederationView(
            federation_id=self.federation_id,
            total_rounds=self.config.federation.rounds,
            current=self._round_view(current) if current else None,
            history=tuple(self._round_view(r) for r in finished),
            done=self._done,
            clients_online=len(self._last_seen),
            model_id=self.manifest.model_id,
            weights_sha256=self.manifest.weights_sha256,
            task=self.manifest.task,
            num_labels=self.manifest.num_labels,
            mode=self.config.federation.mode,
            models=tuple((m.model_id, m.weights_sha256) for m in self.manifest.allowed_models()),
        )

    def _round_view(self, record: RoundRecord) -> RoundView:
        views = []
        for part in self._store.list_participants(record.round):
            client = self._store.get_client(part.client_id)
            views.append(ParticipantView(
                participant=part,
                device_name=client.device_name if client else "",
                device_class=client.capability.device_class if client else None,
            ))
        return RoundView(record=record, participants=tuple(views))

    async def watch(self, history_limit: int = 0) -> AsyncIterator[FederationView]:
        """The status now, then again after every change (coalesced), until the federation is done."""
        while True:
            version = self._version
            event = self._event
            yield self.status(history_limit)
            if self._done:
                return
            if version == self._version:
                await event.wait()


_ROUND_END_POLL = 0.05
_SHARED_REASON = "personalized: every client shares one adapter at lora.max_rank {rank}"


def _check_manifest_for_mode(manifest: ModelManifest, config: CoordinatorConfig) -> None:
    """A manifest that cannot serve the configured mode is a configuration error."""
    if config.federation.mode == "personalized":
        if manifest.dense or manifest.modules_to_save:
            raise ConfigError(
                f"model manifest: federation.mode = 'personalized' shares only a LoRA adapter (the head is "
                f"private to each device), but the manifest federates dense tensors {sorted(manifest.dense)} / "
                f"modules_to_save {list(manifest.modules_to_save)}; write it with "
                "`rankfed edge manifest --shared-layers ...` (docs/personalized.md)"
            )
    elif len(manifest.allowed_models()) > 1:
        raise ConfigError(
            f"model manifest lists {len(manifest.allowed_models())} base models; several models can only "
            "federate with federation.mode = 'personalized' (their LoRA modules differ)"
        )


def _personal_metrics(receipts: list[Receipt]) -> dict[str, float]:
    """Unweighted mean, spread, min and max across clients of each eval metric: pFedLoRA
    reports each client's accuracy on its own held-out data, every client counting once."""
    out: dict[str, float] = {}
    keys = sorted(set().union(*(r.metrics.eval.keys() for r in receipts))) if receipts else []
    for key in keys:
        values = np.array([r.metrics.eval[key] for r in receipts if key in r.metrics.eval], dtype=np.float64)
        out[f"personal_{key}_mean"] = float(values.mean())
        out[f"personal_{key}_std"] = float(values.std())
        out[f"personal_{key}_min"] = float(values.min())
        out[f"personal_{key}_max"] = float(values.max())
        out[f"personal_{key}_clients"] = float(len(values))
    return out


def _check_capability(info: JoinInfo) -> None:
    cap = info.capability
    for name in ("compute_gflops", "upload_bytes_per_second", "download_bytes_per_second"):
        value = getattr(cap, name)
        if not np.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"capability.{name} must be a finite non-negative number, got {value}")


def _round_metrics(receipts: list[Receipt], parts: list[Participant]) -> dict[str, float]:
    metrics: dict[str, float] = {
        "participants": float(len(parts)),
        "updates": float(len(receipts)),
        "bytes_up": float(sum(p.bytes_up for p in parts)),
        "bytes_down": float(sum(p.bytes_down for p in parts)),
    }
    total = sum(r.num_examples for r in receipts)
    if total:
        metrics["loss_first"] = sum(r.metrics.loss_first * r.num_examples for r in receipts) / total
        metrics["loss_last"] = sum(r.metrics.loss_last * r.num_examples for r in receipts) / total
        keys = set().union(*(r.metrics.eval.keys() for r in receipts))
        for key in sorted(keys):
            having = [r for r in receipts if key in r.metrics.eval]
            weight = sum(r.num_examples for r in having)
            metrics[f"eval_{key}"] = sum(r.metrics.eval[key] * r.num_examples for r in having) / weight
    return metrics
