"""What the parts of a federation share: its configuration, stores and clock, the change
notifier every long-poll and status stream waits on, and the state of the open round and
the global adapter. `Federation` builds one and hands it to each part (registry, dispatch,
rounds, ingest, status), so no part reaches into another's fields."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from rankfed.aggregation import Accumulator, Adapter, get_method
from rankfed.coordinator import rank_policy
from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.errors import ConfigError, NotFoundError
from rankfed.coordinator.global_adapters import GlobalAdapters
from rankfed.coordinator.models import ClientRecord, RoundRecord
from rankfed.coordinator.staging import Staging
from rankfed.coordinator.store import BlobStore, StateStore
from rankfed.protocol import FederationMode, LoraSettings, ParticipantState
from rankfed.protocol.manifest import ModelManifest

if TYPE_CHECKING:
    from rankfed.coordinator.uploads import UploadSession

# A participant in one of these states still owes the round something.
OPEN_STATES = (
    ParticipantState.ASSIGNED, ParticipantState.DOWNLOADING, ParticipantState.TRAINING, ParticipantState.UPLOADING,
)


WAKE_BATCH = 50  # long-polls woken per turn of the event loop (Changes._wake)


class Changes:
    """A version counter and an event that fires on every change: status streams and the
    round loop wait on it instead of polling the store.

    GetTask long-polls wait for their own device (`wait_task`), woken only when what a task
    can be changed for it: the phase given to `track_phase` (done, open round, its phase)
    changed and the device is in its audience (the open round's participants; everyone
    once the federation is done). Waking every held long-poll on every join, heartbeat and
    chunk was, with 10,000 devices polling, most of the event loop's time; waking all of
    them on each of a round's three phase changes, to answer 9,000 of them "not you",
    delayed every due long-poll by the length of that burst (bench/load_bench.py)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._phase: Callable[[], object] = tuple
        self._audience: Callable[[], Collection[str] | None] = lambda: None
        self._last_phase: object = None
        self._waiting: dict[str, list[asyncio.Event]] = {}  # long-polls by device
        self.version = 0

    def track_phase(self, phase: Callable[[], object],
                    audience: Callable[[], Collection[str] | None] = lambda: None) -> None:
        """`audience()`: the devices a change of `phase()` may give a task (None: all)."""
        self._phase, self._audience = phase, audience
        self._last_phase = phase()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()
        phase = self._phase()
        if phase != self._last_phase:
            self._last_phase = phase
            audience = self._audience()
            woken = self._waiting.keys() if audience is None else [c for c in audience if c in self._waiting]
            self._wake([event for client_id in list(woken) for event in self._waiting.pop(client_id)])

    def _wake(self, events: list[asyncio.Event], start: int = 0) -> None:
        """Set `events` WAKE_BATCH at a time, one batch per turn of the event loop: every
        woken long-poll then answers in the same turn, and 1,000 of them at once (a round's
        start; 10,000 when the federation ends) held every timer due meanwhile (other
        long-polls' WAIT, heartbeats' answers) for the whole burst."""
        end = start + WAKE_BATCH
        for event in events[start:end]:
            event.set()
        if end < len(events):
            asyncio.get_running_loop().call_soon(self._wake, events, end)

    async def wait_task(self, client_id: str, timeout: float) -> None:
        """Until a phase change this device is in the audience of, or `timeout` seconds."""
        event = asyncio.Event()
        self._waiting.setdefault(client_id, []).append(event)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            events = self._waiting.get(client_id)
            if events is not None and event in events:
                events.remove(event)
                if not events:
                    del self._waiting[client_id]

    @property
    def event(self) -> asyncio.Event:
        """The event the next change sets (take it before reading the state it guards)."""
        return self._event

    async def wait(self, timeout: float) -> None:
        # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives as its inner wait ends, and stop() then hung until the
        # round's deadline (a graceful SIGTERM became a SIGKILL under systemd's timeout).
        event = self._event
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await event.wait()
        except TimeoutError:
            pass


@dataclass
class RoundState:
    """The open round and the global adapter, as the round loop, dispatch and ingest see them."""

    open: RoundRecord | None = None
    accumulator: Accumulator | None = None
    global_adapter: Adapter | None = None
    global_round: int = 0
    global_sha: tuple[int, str] | None = None  # (round, sha256) cache of the global adapter's digest
    reasons: dict[str, str] = field(default_factory=dict)  # why each participant got its rank
    # The open round's participants (fixed when it starts): a long-poll of anyone else is
    # answered without reading the store.
    participants: frozenset[str] = frozenset()
    # Updates folded into the running aggregate, and their norms (for robust clipping).
    norms: dict[str, float] = field(default_factory=dict)
    # Updates whose fold failed (e.g. an overflow): the round closes without them.
    fold_failures: dict[str, str] = field(default_factory=dict)
    uploading: dict[str, UploadSession] = field(default_factory=dict)  # open upload streams by client
    done: bool = False
    close_now: bool = False  # an operator asked to close the open round (CloseRound, StopFederation)
    paused: bool = False  # mirrors the persisted operator flag (read on every WAIT answer)
    # Held while an update is committed and folded, and while a round closes.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def current_global(self) -> Adapter:
        if self.global_adapter is None:
            raise RuntimeError("the global adapter is loaded by Federation.start()")
        return self.global_adapter


class FederationContext:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        blobs: BlobStore,
        manifest: ModelManifest,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_manifest_for_mode(manifest, config)
        self.config = config
        self.store = store
        self.blobs = blobs
        self.manifest = manifest
        self.clock = clock
        self.changes = Changes()
        self.state = RoundState()
        # Read self.state at each change: a new run replaces the RoundState object.
        self.changes.track_phase(
            lambda: (self.state.done, self.state.open.round if self.state.open else 0,
                     self.state.open.phase if self.state.open else None),
            audience=lambda: None if self.state.done else self.state.participants,
        )
        self.method = get_method(config.federation.method)
        self.personalized = config.federation.mode == FederationMode.PERSONALIZED
        # Rules that average A and B as they are need every client at the same rank.
        self.homogeneous = self.personalized or self.method.homogeneous
        self.spec = manifest.adapter_spec()
        self.globals = GlobalAdapters(blobs, manifest, self.method, seed=config.federation.seed)
        # Bytes of broken uploads kept for a resume (rankfed.coordinator.staging).
        self.staging = Staging(blobs, ttl_s=config.server.upload_resume_ttl_seconds, clock=clock)

    def reset_run(self) -> None:
        """A fresh round state and global-adapter cache for a new run (the stores were reset)."""
        self.state = RoundState()
        self.globals = GlobalAdapters(self.blobs, self.manifest, self.method, seed=self.config.federation.seed)

    def lora_for_rank(self, rank: int, *, alpha: float | None = None) -> LoraSettings:
        settings = rank_policy.lora_settings(
            rank,
            self.config.lora,
            target_modules=tuple(self.manifest.target_modules),
            modules_to_save=tuple(self.manifest.modules_to_save),
        )
        return settings if alpha is None else replace(settings, alpha=alpha)

    def require_client(self, client_id: str) -> ClientRecord:
        client = self.store.get_client(client_id)
        if client is None:
            raise NotFoundError(f"unknown client {client_id}")
        return client


SHARED_REASON = "personalized: every client shares one adapter at lora.max_rank {rank}"


def check_manifest_for_mode(manifest: ModelManifest, config: CoordinatorConfig) -> None:
    """A manifest that cannot serve the configured mode is a configuration error."""
    if config.federation.mode == FederationMode.PERSONALIZED:
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
