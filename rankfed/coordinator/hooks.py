"""Listeners on the federation's round-closed hook (`Federation.on_round_closed`, one
callable): metrics, retention and experiment tracking each add theirs here, in order, and
an exception in one is logged instead of reaching the round loop: a failed clean-up or an
unreachable tracking server must never stop a federation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rankfed.coordinator.federation import Federation
    from rankfed.coordinator.models import RoundRecord

log = logging.getLogger("rankfed.coordinator")


def add_round_closed(federation: Federation, listener: Callable[[RoundRecord], object], what: str) -> None:
    """Call `listener(record)` after each closed round, after the listeners added before it."""
    previous = federation.on_round_closed

    def both(record: RoundRecord) -> None:
        if previous is not None:
            previous(record)
        try:
            listener(record)
        except Exception:  # noqa: BLE001 - see the module docstring
            log.exception("%s failed after round %d; the federation goes on", what, record.round)

    federation.on_round_closed = both
