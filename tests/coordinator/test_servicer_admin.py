"""AdminServicer.WatchRounds: the streams woken by one change share one status (StatusView)
and are sent one conversion of it, not one per stream."""

from __future__ import annotations

import asyncio
from typing import Any

from rankfed.coordinator.federation import Federation
from rankfed.coordinator.servicer_admin import AdminServicer
from rankfed.coordinator.store import MemoryStore
from rankfed.coordinator.store.blobs import BlobStore
from rankfed.protocol import FederationStatus, serde
from rankfed.v1 import admin_pb2 as ProtoAdmin
from tests.coordinator.harness import make_config, manifest


class _Loopback:
    """The ServicerContext of a plaintext call from loopback (no admin token configured)."""

    def auth_context(self) -> dict[str, Any]:
        return {}

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


def test_watch_streams_woken_by_one_change_are_sent_one_conversion(tmp_path, monkeypatch) -> None:
    converted: list[FederationStatus] = []
    to_proto = serde.federation_status_to_proto

    def counting(view: FederationStatus) -> ProtoAdmin.FederationStatus:
        converted.append(view)
        return to_proto(view)

    monkeypatch.setattr(serde, "federation_status_to_proto", counting)

    async def scenario() -> None:
        config = make_config(tmp_path / "data")
        fed = Federation(config, MemoryStore(), BlobStore(tmp_path / "data" / "blobs"), manifest())
        fed.registry.start()
        servicer = AdminServicer(fed, "")
        streams = [servicer.WatchRounds(ProtoAdmin.WatchRoundsRequest(), _Loopback()) for _ in range(3)]
        first = [await anext(s) for s in streams]
        assert all(m is first[0] for m in first) and len(converted) == 1
        assert first[0].federation_id == fed.federation_id

        fed.ctx.changes.notify()
        second = [await anext(s) for s in streams]
        assert all(m is second[0] for m in second) and second[0] is not first[0] and len(converted) == 2

        other = servicer.WatchRounds(ProtoAdmin.WatchRoundsRequest(history_limit=1), _Loopback())
        assert await anext(other) is not second[0] and len(converted) == 3  # its own status, converted
        for stream in [*streams, other]:
            await stream.aclose()

    asyncio.run(scenario())
