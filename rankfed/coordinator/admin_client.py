"""A typed client of the AdminService, for operators' tools: `rankfed status`, the demo, the
benchmarks and the tests. It speaks `rankfed.protocol` dataclasses; nothing that uses it sees
a generated message or a grpc error.

    with AdminClient("127.0.0.1:50051", admin_token=token) as admin:
        status = admin.status(history_limit=5)        # FederationStatus
        for status in admin.watch():                   # until the federation is done
            ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from rankfed.protocol import ClientInfo, FederationStatus, RoundStatus, serde
from rankfed.tls import TlsOptions, channel_for
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import admin_pb2_grpc


class AdminError(Exception):
    """The coordinator refused or could not answer an operator call. `code` is the gRPC
    status name (e.g. "UNAVAILABLE", "UNAUTHENTICATED"), for code to compare."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(
        self, address: str, *, admin_token: str = "", tls: TlsOptions | None = None, timeout_s: float = 30.0
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self._channel = channel_for(address, tls)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, what: str, call: Any, request: Any) -> Any:
        """One unary call with the operator's credentials; a gRPC failure becomes AdminError."""
        try:
            return call(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise self._error(err, what) from None

    def _error(self, err: grpc.RpcError, what: str) -> AdminError:
        code = err.code() if isinstance(err, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        return AdminError(f"{what}: {name}: {details} (coordinator {self.address})", code=name)

    def status(self, history_limit: int = 0) -> FederationStatus:
        """The federation now: current round, its participants, and up to `history_limit` past rounds (0: all)."""
        reply = self._call("GetRoundStatus", self._stub.GetRoundStatus,
                           ProtoAdmin.GetRoundStatusRequest(history_limit=history_limit))
        return serde.federation_status_from_proto(reply)

    def watch(self, history_limit: int = 0) -> Iterator[FederationStatus]:
        """The status now, then after every change, until the federation is done."""
        try:
            for reply in self._stub.WatchRounds(
                ProtoAdmin.WatchRoundsRequest(history_limit=history_limit), metadata=self._metadata
            ):
                yield serde.federation_status_from_proto(reply)
        except grpc.RpcError as err:
            raise self._error(err, "WatchRounds") from None

    def clients(self) -> list[ClientInfo]:
        """Every registered device, with its capability, rank and liveness (all pages)."""
        out: list[ClientInfo] = []
        token = ""
        while True:
            reply = self._call("ListClients", self._stub.ListClients, ProtoAdmin.ListClientsRequest(page_token=token))
            page = serde.client_page_from_proto(reply)
            out.extend(page.clients)
            if not page.next_page_token:
                return out
            token = page.next_page_token

    # -- operator controls: each returns what the coordinator did, for a person

    def _control(self, what: str, call: Any, request: Any) -> str:
        return str(self._call(what, call, request).message)

    def pause(self, reason: str = "") -> str:
        return self._control("PauseFederation", self._stub.PauseFederation, ProtoAdmin.ControlRequest(reason=reason))

    def resume(self, reason: str = "") -> str:
        return self._control("ResumeFederation", self._stub.ResumeFederation, ProtoAdmin.ControlRequest(reason=reason))

    def close_round(self, reason: str = "") -> str:
        return self._control("CloseRound", self._stub.CloseRound, ProtoAdmin.ControlRequest(reason=reason))

    def stop(self, reason: str = "") -> str:
        return self._control("StopFederation", self._stub.StopFederation, ProtoAdmin.ControlRequest(reason=reason))

    def remove_device(self, device_name: str, *, ban: bool = False, reason: str = "") -> str:
        request = ProtoAdmin.RemoveDeviceRequest(device_name=device_name, ban=ban, reason=reason)
        return self._control("RemoveDevice", self._stub.RemoveDevice, request)

    def allow_device(self, device_name: str) -> str:
        return self._control("AllowDevice", self._stub.AllowDevice, ProtoAdmin.AllowDeviceRequest(device_name=device_name))

    def new_run(self, reason: str = "") -> str:
        return self._control("StartFederation", self._stub.StartFederation, ProtoAdmin.ControlRequest(reason=reason))

    def history(self) -> list[RoundStatus]:
        """Every finished round, oldest first (all pages of GetRoundStatus's history)."""
        rounds: list[RoundStatus] = []
        token = ""
        while True:
            reply = self._call("GetRoundStatus", self._stub.GetRoundStatus,
                               ProtoAdmin.GetRoundStatusRequest(page_token=token))
            status = serde.federation_status_from_proto(reply)
            rounds[:0] = status.history
            if not status.next_page_token:
                return rounds
            token = status.next_page_token


ADMIN_TOKEN_FILE = "admin-token"


def resolve_admin_token(explicit: str = "", data_dir: str | os.PathLike[str] | None = None) -> str:
    """The operator token to send: the one given, else $RANKFED_ADMIN_TOKEN, else the token a
    coordinator generated into DATA_DIR/admin-token (readable only by its owner), else ""."""
    if explicit:
        return explicit
    if os.environ.get("RANKFED_ADMIN_TOKEN"):
        return os.environ["RANKFED_ADMIN_TOKEN"]
    if data_dir is not None:
        try:
            return (Path(data_dir) / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""  # no generated token here: the coordinator may not need one
        # Any other OSError (e.g. permission denied: the file is the coordinator user's only)
        # propagates: the tools report it instead of calling without a token.
    return ""


def client_from_args(args: Any, prog: str) -> AdminClient | None:
    """The AdminClient a CLI's operator flags describe (--address, --admin-token, --data-dir,
    --tls-*, --timeout); None after printing why on stderr (the caller exits 2)."""
    import sys

    from rankfed.tls import TlsError

    try:
        token = resolve_admin_token(args.admin_token, args.data_dir)
    except OSError as exc:
        print(f"{prog}: cannot read the operator token: {exc} (run as the coordinator's user, or pass --admin-token)",
              file=sys.stderr)
        return None
    try:
        tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if (
            args.tls_ca or args.tls_cert) else None
        return AdminClient(args.address, admin_token=token, tls=tls, timeout_s=args.timeout)
    except TlsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
