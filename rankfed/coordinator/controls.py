"""Operator controls: pause and resume, close the open round now, stop the federation,
remove or ban a device. Each is one core call, persisted where a restart must keep it
(paused, stopped, banned names live in the state store's metadata), and logged with the
operator who asked."""

from __future__ import annotations

import logging
from dataclasses import replace

from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.errors import NotFoundError, PreconditionError
from rankfed.coordinator.registry import ClientRegistry
from rankfed.protocol import RoundPhase, limits

log = logging.getLogger("rankfed.coordinator")

_PAUSED, _STOPPED = "operator.paused", "operator.stopped"


class Controls:
    def __init__(self, ctx: FederationContext, registry: ClientRegistry) -> None:
        self._ctx = ctx
        self._registry = registry

    # ------------------------------------------------------------------ state the loops read

    def load(self) -> None:
        """The persisted pause flag into the round state (start-up)."""
        self._ctx.state.paused = self._ctx.store.get_meta(_PAUSED) == "1"

    @property
    def paused(self) -> bool:
        return self._ctx.state.paused

    @property
    def stopped(self) -> bool:
        return self._ctx.store.get_meta(_STOPPED) == "1"


    # ------------------------------------------------------------------ actions
    # Each action that changes state syncs the store before it answers (rare, so on the
    # loop): an operator's answer is a promise that must survive a power cut.

    def pause(self, operator: str, reason: str) -> str:
        self._log("pause", operator, reason)
        if self.paused:
            return "already paused"
        self._ctx.store.set_meta(_PAUSED, "1")
        self._ctx.store.sync()
        self._ctx.state.paused = True
        self._ctx.changes.notify()
        return "paused: no new round starts until resume (an open round runs to its close)"

    def resume(self, operator: str, reason: str) -> str:
        self._log("resume", operator, reason)
        if not self.paused:
            return "not paused"
        self._ctx.store.set_meta(_PAUSED, "0")
        self._ctx.store.sync()
        self._ctx.state.paused = False
        self._ctx.changes.notify()
        return "resumed"

    def close_round(self, operator: str, reason: str) -> str:
        record = self._ctx.state.open
        if record is None or record.phase is not RoundPhase.TRAINING:
            raise PreconditionError("no round is open for training: nothing to close")
        self._log("close_round", operator, reason, round=record.round)
        self._ctx.state.close_now = True
        self._ctx.changes.notify()
        return f"round {record.round} closes now"

    def stop(self, operator: str, reason: str) -> str:
        self._log("stop", operator, reason)
        self._ctx.store.set_meta(_STOPPED, "1")
        self._ctx.store.sync()
        if self._ctx.state.open is not None:
            self._ctx.state.close_now = True
        self._ctx.changes.notify()
        return "stopping: the open round (if any) closes now and no other starts"

    def remove_device(self, operator: str, device_name: str, *, ban: bool, reason: str) -> str:
        name = limits.check_device_name(device_name)
        client = self._ctx.store.find_client_by_name(name)
        if client is None and not ban:
            raise NotFoundError(f"no device named {name!r} is registered")
        self._log("remove_device", operator, reason, device=name, ban=ban)
        if client is not None:
            self._registry.revoke(client.client_id)
            self._registry.unbind(client.client_id)  # the name is free for the next device
            self._ctx.store.upsert_client(replace(client, left=True, online=False))
        if ban:
            self._registry.set_banned([*self._registry.banned(), name])
        self._ctx.store.sync()  # an operator told "its tokens no longer work" must find it so after a power cut
        self._ctx.changes.notify()
        return f"removed {name}" + (" and banned it" if ban else "") + "; its session tokens no longer work"

    def allow_device(self, operator: str, device_name: str) -> str:
        name = limits.check_device_name(device_name)
        self._log("allow_device", operator, "", device=name)
        banned = self._registry.banned()
        if name not in banned:
            return f"{name} was not banned"
        self._registry.set_banned([n for n in banned if n != name])
        self._ctx.store.sync()
        self._ctx.changes.notify()
        return f"{name} may join again"

    def _log(self, action: str, operator: str, reason: str, **fields: object) -> None:
        log.info("operator action", extra={"action": action, "operator": operator, "reason": reason[:1024], **fields})
