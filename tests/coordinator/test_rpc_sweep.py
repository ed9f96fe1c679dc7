"""Every RPC, fuzzed from its message descriptor: hypothesis builds request messages with
deep nesting, huge and boundary integers, odd unicode, NaN and infinities, unknown enum
values and truncated chunk streams, and sends them over real gRPC — with no token, a
forged one, and a valid device token — to a real coordinator. Nothing may answer INTERNAL
or UNKNOWN, and the coordinator must still answer health checks afterwards."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import admin_pb2_grpc, edge_pb2_grpc, evaluator_pb2_grpc
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import evaluator_pb2 as ProtoEvaluator
from tests.coordinator.harness import EdgeTestClient

SWEEP = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

_INTS = {
    FieldDescriptor.TYPE_UINT32: st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.sampled_from([0, 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1])
    | st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.sampled_from([-(2**63), -1, 0, 2**63 - 1]) | st.integers(-(2**63), 2**63 - 1),
}
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300) | st.sampled_from(
    ["", "\u202e\u0000\x1b[31m", "../../etc/passwd", "𝕏" * 200, "a" * 5000, "\ufeff", "0" * 4400]
)
_DOUBLES = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf, 1e308])


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99, 2**31 - 1])
    if field.type in _INTS:
        return _INTS[field.type]
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _DOUBLES
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=512)
    return _TEXT


def _message(descriptor: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field values (a subset of the fields), nested messages as dicts."""
    if depth > 4:
        return st.just({})
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(_value(key, depth), _value(value, depth), max_size=40)
        elif field.is_repeated:
            fields[field.name] = st.lists(_value(field, depth), max_size=5)
        else:
            fields[field.name] = _value(field, depth)
    return st.fixed_dictionaries({}, optional=fields)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    _fill(message, values)
    return message


def _fill(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, dict):
                    _fill(target[k], v)
                else:
                    target[k] = v
        elif field.is_repeated:
            for item in value:
                if isinstance(item, dict):
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif isinstance(value, dict):
            _fill(target, value)
            target.SetInParent()
        else:
            try:
                setattr(message, name, value)
            except (ValueError, TypeError):  # e.g. a timestamp field's range: not sendable at all
                pass


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.coordinator.harness import CoordinatorThread, make_config, manifest

    data = tmp_path_factory.mktemp("sweep")
    server = CoordinatorThread(make_config(data, **{"federation.min_clients": 1, "federation.rounds": 50}))
    client = EdgeTestClient(server.address, "sweeper")
    client.join(manifest().weights_sha256)
    channel = grpc.insecure_channel(server.address)
    yield server, client, edge_pb2_grpc.EdgeServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel)
    channel.close()
    client.close()
    server.stop()


def _call(fn, *args, **kwargs) -> None:
    try:
        result = fn(*args, timeout=10, **kwargs)
        if hasattr(result, "__next__"):  # a server stream: its first message (WatchRounds waits after it)
            next(result, None)
            result.cancel()
    except grpc.RpcError as err:
        assert err.code() not in SERVER_ERRORS, f"{err.code()}: {err.details()}"


def _auth(client: EdgeTestClient, which: str) -> tuple[tuple[str, str], ...]:
    return {"none": (), "forged": (("authorization", "Bearer forged.token.x"),), "valid": client.metadata}[which]


AUTH = st.sampled_from(["none", "forged", "valid"])


@SWEEP
@given(_message(ProtoEdge.JoinRequest.DESCRIPTOR))
def test_join(target, values):
    _, _, edge, _ = target
    _call(edge.Join, _build(ProtoEdge.JoinRequest, values))


@SWEEP
@given(_message(ProtoEdge.GetTaskRequest.DESCRIPTOR), _message(ProtoEdge.HeartbeatRequest.DESCRIPTOR),
       _message(ProtoEdge.LeaveRequest.DESCRIPTOR), _message(ProtoEdge.DownloadRequest.DESCRIPTOR), AUTH)
def test_unary_and_download(target, get_task, heartbeat, leave, download, auth):
    _, client, edge, _ = target
    metadata = _auth(client, auth)
    request = _build(ProtoEdge.GetTaskRequest, get_task)
    request.max_wait.FromSeconds(0)  # never wait out a long-poll here
    _call(edge.GetTask, request, metadata=metadata)
    _call(edge.Heartbeat, _build(ProtoEdge.HeartbeatRequest, heartbeat), metadata=metadata)
    _call(edge.DownloadAdapter, _build(ProtoEdge.DownloadRequest, download), metadata=metadata)
    if auth != "valid":  # a valid Leave would end the session the rest of the sweep uses
        _call(edge.Leave, _build(ProtoEdge.LeaveRequest, leave), metadata=metadata)


@SWEEP
@given(st.lists(_message(ProtoEdge.UploadMessage.DESCRIPTOR), max_size=6), AUTH)
def test_upload_streams(target, messages, auth):
    _, client, edge, _ = target
    _call(edge.UploadUpdate, iter([_build(ProtoEdge.UploadMessage, m) for m in messages]), metadata=_auth(client, auth))


@SWEEP
@given(_message(ProtoEdge.UploadStatusRequest.DESCRIPTOR), AUTH)
def test_upload_status(target, values, auth):
    _, client, edge, _ = target
    _call(edge.UploadStatus, _build(ProtoEdge.UploadStatusRequest, values), metadata=_auth(client, auth))


@SWEEP
@given(_message(ProtoAdmin.GetRoundStatusRequest.DESCRIPTOR), _message(ProtoAdmin.ListClientsRequest.DESCRIPTOR),
       _message(ProtoAdmin.WatchRoundsRequest.DESCRIPTOR))
def test_admin(target, status, clients, watch):
    _, _, _, admin = target
    _call(admin.GetRoundStatus, _build(ProtoAdmin.GetRoundStatusRequest, status))
    _call(admin.ListClients, _build(ProtoAdmin.ListClientsRequest, clients))
    _call(admin.WatchRounds, _build(ProtoAdmin.WatchRoundsRequest, watch))


@pytest.fixture(scope="module")
def evaluator(target):
    server, _, _, _ = target
    channel = grpc.insecure_channel(server.address)
    yield evaluator_pb2_grpc.EvaluatorServiceStub(channel)
    channel.close()


@SWEEP
@given(_message(ProtoEvaluator.GetEvaluationTaskRequest.DESCRIPTOR),
       _message(ProtoEvaluator.EvaluationDownloadRequest.DESCRIPTOR), _message(ProtoEvaluator.ScoreReport.DESCRIPTOR),
       AUTH)
def test_evaluator(target, evaluator, task, download, report, auth):
    # "none" reaches the core: the sweep's coordinator lets loopback callers be operators.
    _, client, _, _ = target
    metadata = _auth(client, auth)
    request = _build(ProtoEvaluator.GetEvaluationTaskRequest, task)
    request.max_wait.FromSeconds(0)
    _call(evaluator.GetEvaluationTask, request, metadata=metadata)
    _call(evaluator.DownloadEvaluationAdapter, _build(ProtoEvaluator.EvaluationDownloadRequest, download),
          metadata=metadata)
    _call(evaluator.ReportScores, _build(ProtoEvaluator.ScoreReport, report), metadata=metadata)


def test_still_serving_after_the_sweep(target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, _, _, _ = target
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
