"""Devices and their sessions: Join and Leave, tokens, liveness (heartbeats, long-polls,
uploads count as signs of life), and the client list operators see."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from rankfed.coordinator import rank_policy
from rankfed.coordinator.auth import EDGE_AUDIENCE, TokenSigner
from rankfed.coordinator.context import OPEN_STATES, SHARED_REASON, FederationContext
from rankfed.coordinator.errors import (
    AuthError,
    InvalidArgumentError,
    PermissionDeniedError,
    PreconditionError,
)
from rankfed.coordinator.models import ClientRecord
from rankfed.protocol import (
    Assignment,
    BaseModel,
    ClientInfo,
    ClientPage,
    FederationMode,
    HeartbeatRequest,
    HeartbeatResult,
    JoinRequest,
    JoinResult,
    LeaveRequest,
    ParticipantState,
    RoundPhase,
    limits,
)

log = logging.getLogger("rankfed.coordinator")

BANNED_KEY = "operator.banned"
_KEY_META = "device_key_sha256:"
MAX_CLIENT_PAGE = 500  # devices per ListClients reply: ~200 bytes each, far below the message limit


class ClientRegistry:
    def __init__(self, ctx: FederationContext) -> None:
        self._ctx = ctx
        self._last_seen: dict[str, float] = {}
        self._polling: dict[str, int] = {}  # clients inside a GetTask long-poll: they are alive
        self.signer: TokenSigner | None = None
        # Token generations by client, cached: authenticate runs on every RPC of every device.
        self._generations: dict[str, int] = {}
        self.federation_id = ""

    def start(self) -> None:
        """Load (or create) the federation's id and token key; every known device gets one
        heartbeat timeout to show up after a restart."""
        self.federation_id = self._meta_or_create("federation_id", lambda: "fed-" + secrets.token_hex(6))
        key = self._meta_or_create("token_key", lambda: TokenSigner.new_key().hex())
        self.signer = TokenSigner(bytes.fromhex(key))
        now = self._ctx.clock()
        for client in self._ctx.store.list_clients():
            if not client.left:
                self._last_seen[client.client_id] = now

    def _meta_or_create(self, key: str, make: Callable[[], str]) -> str:
        value = self._ctx.store.get_meta(key)
        if value is None:
            value = make()
            self._ctx.store.set_meta(key, value)
        return value

    def _signer(self) -> TokenSigner:
        if self.signer is None:
            raise RuntimeError("Federation.start() loads the token key")
        return self.signer

    # ------------------------------------------------------------------ sessions

    def authenticate(self, token: str | None) -> str:
        """The client id behind a session token; AuthError for a missing, forged or expired one."""
        if not token:
            raise AuthError("missing session token: send 'authorization: Bearer <token>' from Join")
        claims = self._signer().verify(token, audience=EDGE_AUDIENCE, now=self._ctx.clock())
        client = self._ctx.store.get_client(claims.client_id)
        if client is None:
            raise AuthError("session token names an unknown client; join again")
        if client.left:
            raise AuthError("this client left the federation (or an operator removed it); join again to come back")
        if claims.generation != self._generation(client.client_id):
            raise AuthError("this session token was revoked (the device joined again, or an operator removed it); "
                            "use the token of the latest Join")
        self.touch(client.client_id)
        return client.client_id

    def touch(self, client_id: str) -> None:
        was_online = client_id in self._last_seen
        self._last_seen[client_id] = self._ctx.clock()
        if not was_online:
            self._ctx.changes.notify()

    def join(self, info: JoinRequest, *, enrolled_by_certificate: bool = False) -> JoinResult:
        """Register (or re-register) a device. `enrolled_by_certificate`: the transport
        verified the device's client certificate (mutual TLS), which replaces the secret."""
        ctx, cfg = self._ctx, self._ctx.config
        secret = limits.check_secret(info.enrollment_secret)
        if (cfg.server.enrollment_secret and not enrolled_by_certificate
                and not secrets.compare_digest(secret, cfg.server.enrollment_secret.encode())):
            raise PermissionDeniedError("enrollment secret is wrong; ask the operator for the federation's secret")
        name = limits.check_device_name(info.device_name)
        if name in self.banned():
            raise PermissionDeniedError(f"device {name!r} was banned by the operator; ask them to allow it again")
        _check_join(info)
        model = ctx.manifest.model_for(info.base_model_sha256)
        if model is None:
            allowed = ctx.manifest.allowed_models()
            names = ", ".join(f"{m.model_id} with sha256 {m.weights_sha256[:16]}…" for m in allowed)
            raise PreconditionError(
                f"this device's base model has weights sha256 {info.base_model_sha256[:16] or '(none)'}…, the "
                f"federation trains {names}; install {'one of those models' if len(allowed) > 1 else 'that model'}"
            )
        now = ctx.clock()
        existing = ctx.store.find_client_by_name(name)
        if existing is not None and not enrolled_by_certificate:
            self._check_device_key(existing.client_id, name, info.device_key)
        demotions = 0 if existing is None else rank_policy.demotions_for(
            existing.deadlines_missed, cfg.federation.demote_after_missed_deadlines
        )
        rank, tier, reason = rank_policy.assign(
            info.capability, cfg.rank_policy, max_rank=cfg.lora.max_rank, demotions=demotions,
            current_tier=existing.tier if existing is not None and not demotions else None,
        )
        if ctx.personalized:
            rank, reason = cfg.lora.max_rank, SHARED_REASON.format(rank=cfg.lora.max_rank)
        elif cfg.rank_policy.allocation != "capability":
            reason += f"; each round's rank follows the devices' {cfg.rank_policy.allocation} scores under this cap"
        if existing is None:
            client = ClientRecord(
                client_id="c-" + secrets.token_hex(6), device_name=name, capability=info.capability,
                num_examples=info.num_examples, joined_at=now, last_seen_at=now, rank=rank, tier=tier,
            )
        else:
            client = replace(
                existing, capability=info.capability, num_examples=info.num_examples, last_seen_at=now,
                rank=rank, tier=tier, online=True, left=False,
            )
        ctx.store.upsert_client(client)
        device_key = "" if enrolled_by_certificate else self._bind_if_unbound(client.client_id)
        # A new Join revokes the device's earlier tokens: whoever held them must join again.
        generation = self._next_generation(client.client_id) if existing is not None else self._generation(client.client_id)
        token, expires = self._signer().issue(
            client.client_id, audience=EDGE_AUDIENCE, ttl_seconds=cfg.server.token_ttl_seconds, now=now,
            generation=generation,
        )
        self.touch(client.client_id)
        ctx.changes.notify()
        log.info("client joined", extra={"client_id": client.client_id, "device": name, "rank": rank, "tier": tier})
        return JoinResult(
            client_id=client.client_id,
            session_token=token,
            token_expires_at=expires,
            assignment=Assignment(lora=ctx.lora_for_rank(rank), tier=tier, reason=reason),
            base_model=BaseModel(
                id=model.model_id, weights_sha256=model.weights_sha256, task=ctx.manifest.task,
                num_labels=ctx.manifest.num_labels,
            ),
            heartbeat_interval_s=cfg.federation.heartbeat_interval_seconds,
            federation_id=self.federation_id,
            device_key=device_key,
            max_chunk_bytes=cfg.server.max_chunk_bytes,
            mode=FederationMode(cfg.federation.mode),
        )

    def leave(self, client_id: str, request: LeaveRequest) -> None:
        client = self._ctx.require_client(client_id)
        self._ctx.store.upsert_client(replace(client, left=True, online=False))
        self._last_seen.pop(client_id, None)
        self.mark_gone(client_id)
        log.info("client left", extra={"client_id": client_id, "reason": request.reason[:200]})
        self._ctx.changes.notify()

    def heartbeat(self, client_id: str, request: HeartbeatRequest) -> HeartbeatResult:
        ctx, state = self._ctx, self._ctx.state
        open_round = state.open
        round_open = (open_round is not None and open_round.round == request.round
                      and open_round.phase is RoundPhase.TRAINING)
        if round_open and request.state in (ParticipantState.TRAINING, ParticipantState.UPLOADING):
            part = ctx.store.get_participant(request.round, client_id)
            alive = (ParticipantState.TRAINING, ParticipantState.UPLOADING, ParticipantState.DROPPED)
            if part is not None and part.state in alive and part.state is not request.state:
                ctx.store.put_participant(replace(part, state=request.state))
                ctx.changes.notify()
        return HeartbeatResult(next_in_s=ctx.config.federation.heartbeat_interval_seconds, round_open=round_open)

    @contextmanager
    def polling(self, client_id: str) -> Iterator[None]:
        """A device inside a long-poll is alive until the poll ends."""
        self._polling[client_id] = self._polling.get(client_id, 0) + 1
        try:
            yield
        finally:
            self._polling[client_id] -= 1
            if not self._polling[client_id]:
                del self._polling[client_id]
            self.touch(client_id)

    # ------------------------------------------------------------------ device keys

    # Without mutual TLS a name is bound at its first enrollment to a key only that device
    # holds (it gets it once, in JoinResponse.device_key); the coordinator keeps its sha256.
    # Anyone else joining under the name is refused, instead of taking the device over.

    def _check_device_key(self, client_id: str, name: str, presented: str) -> None:
        held = self._ctx.store.get_meta(_KEY_META + client_id)
        if not held:
            return  # enrolled before keys existed, or freed by an operator: bound at this join
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest()
        if not presented or not secrets.compare_digest(digest, held):
            raise PermissionDeniedError(
                f"device name {name!r} is bound to the device that first enrolled it: join from that device "
                "(it keeps its device key), or ask the operator to free the name (rankfed admin remove-device)"
            )

    def _bind_if_unbound(self, client_id: str) -> str:
        """A new key for a name that has none yet (returned once, to the device); "" otherwise."""
        if self._ctx.store.get_meta(_KEY_META + client_id):
            return ""
        key = secrets.token_urlsafe(32)
        self._ctx.store.set_meta(_KEY_META + client_id, hashlib.sha256(key.encode()).hexdigest())
        return key

    def unbind(self, client_id: str) -> None:
        """An operator frees the name: the next device to join under it is bound to it."""
        self._ctx.store.set_meta(_KEY_META + client_id, "")

    def _generation(self, client_id: str) -> int:
        cached = self._generations.get(client_id)
        if cached is None:
            cached = int(self._ctx.store.get_meta(f"token_generation:{client_id}") or 0)
            self._generations[client_id] = cached
        return cached

    def _next_generation(self, client_id: str) -> int:
        generation = self._generation(client_id) + 1
        self._ctx.store.set_meta(f"token_generation:{client_id}", str(generation))
        self._generations[client_id] = generation
        return generation

    def revoke(self, client_id: str) -> None:
        """An operator removed the device: its tokens stop working and it leaves the open round."""
        self._next_generation(client_id)
        self._last_seen.pop(client_id, None)
        self.mark_gone(client_id)

    def banned(self) -> list[str]:
        """Device names an operator banned (they may not join)."""
        return sorted(json.loads(self._ctx.store.get_meta(BANNED_KEY) or "[]"))

    def set_banned(self, names: list[str]) -> None:
        self._ctx.store.set_meta(BANNED_KEY, json.dumps(sorted(set(names))))

    # ------------------------------------------------------------------ liveness

    def online_ids(self) -> list[str]:
        return sorted(self._last_seen)

    def online_count(self) -> int:
        return len(self._last_seen)

    def mark_gone(self, client_id: str) -> None:
        """A device that left or fell silent is DROPPED from the open round (it may come back)."""
        ctx = self._ctx
        if ctx.state.open is None:
            return
        part = ctx.store.get_participant(ctx.state.open.round, client_id)
        if part is not None and part.state in OPEN_STATES:
            ctx.store.put_participant(replace(part, state=ParticipantState.DROPPED))

    async def watch_liveness(self) -> None:
        timeout = self._ctx.config.federation.heartbeat_timeout_seconds
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = self._ctx.clock()
            for client_id, seen in list(self._last_seen.items()):
                busy = client_id in self._ctx.state.uploading or client_id in self._polling
                if now - seen > timeout and not busy:
                    del self._last_seen[client_id]
                    self.mark_gone(client_id)
                    log.info("client dropped", extra={"client_id": client_id, "silent_for": round(now - seen, 1)})
                    self._ctx.changes.notify()

    # ------------------------------------------------------------------ views

    def client_page(self, page_size: int = 0, page_token: str = "") -> ClientPage:
        """Registered devices in registration order, a page at a time (ListClients)."""
        try:
            start = int(page_token) if page_token else 0
        except ValueError:
            raise InvalidArgumentError(
                f"page_token {page_token[:40]!r} is not one this coordinator issued; pass next_page_token back"
            ) from None
        size = min(page_size or MAX_CLIENT_PAGE, MAX_CLIENT_PAGE)
        everyone = self.list_clients()
        end = start + size
        return ClientPage(clients=tuple(everyone[start:end]), next_page_token=str(end) if end < len(everyone) else "")

    def list_clients(self) -> list[ClientInfo]:
        return [
            ClientInfo(
                client_id=c.client_id, device_name=c.device_name, capability=c.capability, rank=c.rank,
                tier=c.tier, online=c.client_id in self._last_seen, joined_at=c.joined_at,
                last_seen_at=c.last_seen_at, rounds_completed=c.rounds_completed,
                deadlines_missed=c.deadlines_missed, num_examples=c.num_examples, left=c.left,
            )
            for c in self._ctx.store.list_clients()
        ]


def _check_join(info: JoinRequest) -> None:
    """Everything of a Join that is stored and shown to operators, within its bound."""
    cap = info.capability
    for name in ("compute_gflops", "upload_bytes_per_second", "download_bytes_per_second"):
        value = getattr(cap, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"capability.{name} must be a finite non-negative number, got {value}")
    for name in ("memory_total_bytes", "memory_free_bytes", "cpu_cores", "accelerator_memory_bytes"):
        limits.check_int(getattr(cap, name), f"capability.{name}")
    limits.check_text(cap.platform, "capability.platform")
    limits.check_text(cap.accelerator_name, "capability.accelerator_name")
    limits.check_text(info.client_version, "client_version")
    limits.check_int(info.num_examples, "num_examples", limits.MAX_NUM_EXAMPLES)
