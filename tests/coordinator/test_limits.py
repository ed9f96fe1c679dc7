"""Everything a device controls is bounded at the edge of the core (INVALID_ARGUMENT naming
the bound), so nothing it sends can make the operator API exceed the message limit; the
operator API is paginated. Over real gRPC, against a real coordinator."""

from __future__ import annotations

import grpc
import pytest

from rankfed.coordinator.admin_client import AdminClient
from rankfed.protocol import limits
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import common_pb2 as ProtoCommon
from tests.coordinator.harness import EdgeTestClient, admin_stub, random_adapter, status, wait_for


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


@pytest.mark.parametrize(("name", "fields", "fragment"), [
    ("x" * 129, {}, "the limit is 128"),
    ("../../etc/passwd", {}, "device_name may hold only"),
    ("dev\u202eice", {}, "device_name may hold only"),
    ("dev", {"client_version": "v" * 300}, "client_version has 300 characters; the limit is 256"),
    ("dev", {"num_examples": 10**12}, "num_examples = 1000000000000 is outside"),
])
def test_join_fields_are_bounded(start, tiny_manifest, name, fields, fragment):
    server = start()
    client = EdgeTestClient(server.address, name)
    try:
        code, details = _code(lambda: client.join(tiny_manifest.weights_sha256, **fields))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details
    finally:
        client.close()
    assert status(server.address).clients_online == 0


@pytest.mark.parametrize(("capability", "fragment"), [
    ({"platform": "p" * 10_000}, "capability.platform has 10000 characters"),
    ({"accelerator_name": "gpu\x1b[31m"}, "capability.accelerator_name holds control characters"),
    ({"memory_total_bytes": 2**64 - 1}, "capability.memory_total_bytes = 18446744073709551615 is outside"),
])
def test_capability_strings_and_integers_are_bounded(start, tiny_manifest, capability, fragment):
    server = start()
    client = EdgeTestClient(server.address, "dev")
    try:
        cap = ProtoCommon.DeviceCapability(device_class=ProtoCommon.DEVICE_CLASS_CPU, **capability)
        code, details = _code(lambda: client.join(tiny_manifest.weights_sha256, capability=cap))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details
    finally:
        client.close()


@pytest.mark.parametrize("secret", ["pässwörd-\u2603", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")])
def test_a_non_ascii_enrollment_secret_is_refused_not_an_error(start, tiny_manifest, secret):
    server = start(**{"server.enrollment_secret": "let-me-in"})
    client = EdgeTestClient(server.address, "dev")
    try:
        code, details = _code(lambda: client.join(tiny_manifest.weights_sha256, enrollment_secret=secret))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "enrollment secret" in details
        code, details = _code(lambda: client.join(tiny_manifest.weights_sha256, enrollment_secret="s" * 5000))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 1024" in details
    finally:
        client.close()


@pytest.mark.parametrize(("metrics", "fragment"), [
    ({f"m{i}": 0.5 for i in range(limits.MAX_METRICS + 1)}, f"has {limits.MAX_METRICS + 1} entries; the limit is"),
    ({"bad name": 0.5}, "must be 1..64 characters"),
    ({"k" * 65: 0.5}, "must be 1..64 characters"),
])
def test_upload_metrics_are_bounded(start, clients, tiny_manifest, metrics, fragment):
    server = start(**{"federation.min_clients": 1})
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    adapter = random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 0)
    from rankfed.aggregation import encode_adapter

    data = encode_adapter(adapter)
    code, details = _code(lambda: client.upload_bytes(task.round, adapter.max_rank, data, eval=metrics))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details
    client.upload_bytes(task.round, adapter.max_rank, data)  # the same update with sane metrics counts


def test_history_and_clients_come_in_pages(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 3, "federation.min_clients": 1, "federation.clients_per_round": 1,
                      "federation.straggler_grace_seconds": 0.0})
    fleet = clients(server.address, "d0", "d1", "d2", "d3", "d4")
    done = 0
    while done < 3:
        for client in fleet:
            task = client.get_task(0.2)
            if task.WhichOneof("kind") != "train":
                continue
            client.download(task.train.round)
            lora = task.train.assignment.lora
            client.upload(task.train.round, random_adapter(tiny_manifest, lora.rank, lora.alpha, done))
            done += 1
            wait_for(lambda d=done: len(status(server.address).history) >= d, what=f"round {done}")
    channel, stub = admin_stub(server.address)
    with channel:
        pages = []
        token = ""
        while True:
            reply = stub.GetRoundStatus(ProtoAdmin.GetRoundStatusRequest(page_size=1, page_token=token), timeout=10)
            pages.append([r.round for r in reply.history])
            token = reply.next_page_token
            if not token:
                break
        assert pages == [[3], [2], [1]]
        code, details = _code(lambda: stub.GetRoundStatus(ProtoAdmin.GetRoundStatusRequest(page_token="zz"), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details
        first = stub.ListClients(ProtoAdmin.ListClientsRequest(page_size=2), timeout=10)
        assert len(first.clients) == 2 and first.next_page_token
    with AdminClient(server.address) as admin:
        assert sorted(c.device_name for c in admin.clients()) == ["d0", "d1", "d2", "d3", "d4"]
        assert [r.round for r in admin.history()] == [1, 2, 3]
