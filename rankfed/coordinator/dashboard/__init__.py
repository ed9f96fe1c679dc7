"""The live dashboard: a read-only page served on the coordinator's HTTP listener.

`snapshot()` turns the federation's status (the same `Federation.watch()` stream that
`rankfed status --watch` follows over gRPC) into plain JSON for the page; `index.html`,
`app.js` and `style.css` next to this module are the whole front end (no CDN, no build
step: hand-written JS drawing inline SVG charts). Routes are in rankfed/coordinator/http.py.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rankfed.coordinator.federation import Federation
    from rankfed.protocol import FederationStatus, RoundStatus

# name -> content type of each static file the page needs
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def static_file(name: str) -> bytes:
    """The bytes of one of STATIC_FILES (KeyError for any other name)."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    return resources.files(__name__).joinpath(name).read_bytes()


def _round(view: RoundStatus) -> dict[str, Any]:
    return {
        "round": view.round,
        "phase": view.phase.value,
        "method": view.method,
        "started_at": view.started_at,
        "deadline": view.deadline,
        "finished_at": view.finished_at or None,
        "min_clients": view.min_clients,
        "global_rank": view.global_rank,
        "failure_reason": view.failure_reason,
        "metrics": dict(view.metrics),
    }


def snapshot(federation: Federation, view: FederationStatus) -> dict[str, Any]:
    """The page's whole state: the federation, the current round, finished rounds' metrics
    (for the charts) and one row per registered device (class, rank, state, bytes)."""
    current = view.current
    in_round = {p.client_id: p for p in current.participants} if current else {}
    devices = []
    for client in federation.list_clients():
        part = in_round.get(client.client_id)
        if client.left:
            state = "left"
        elif part is not None:
            state = part.state.value
        else:
            state = "online" if client.online else "offline"
        devices.append({
            "client_id": client.client_id,
            "name": client.device_name,
            "device_class": client.capability.device_class.value,
            "gflops": client.capability.compute_gflops,
            "rank": part.rank if part is not None else client.rank,
            "tier": client.tier,
            "state": state,
            "online": bool(client.online and not client.left),
            "bytes_down": part.bytes_down if part is not None else 0,
            "bytes_up": part.bytes_up if part is not None else 0,
            "rounds_completed": client.rounds_completed,
        })
    return {
        "federation_id": view.federation_id,
        "model_id": view.base_model.id,
        "mode": str(view.mode),
        "total_rounds": view.total_rounds,
        "done": view.done,
        "clients_online": view.clients_online,
        "current": _round(current) if current else None,
        "history": [_round(r) for r in view.history],
        "devices": devices,
    }
