"""Transport security and credentials: TLS, mutual TLS with device and operator
certificates (made by deploy/make-certs.sh), the loopback-only rule without TLS, and
tokens that are not accepted across services or devices."""

from __future__ import annotations

import grpc
import pytest

from rankfed.cli import main
from rankfed.coordinator.admin_client import AdminError
from rankfed.coordinator.errors import ConfigError
from rankfed.coordinator.server import transport_credentials
from rankfed.tls import (
    TlsError,
    TlsOptions,
    client_channel_credentials,
    is_loopback_address,
    peer_is_loopback,
)
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import edge_pb2 as ProtoEdge
from tests.coordinator.harness import (
    EdgeTestClient,
    admin_stub,
    make_certs,
    make_config,
    status,
)

SECRET = "enroll-me"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    """Another CA issuing a certificate for the same device name."""
    return make_certs(tmp_path_factory.mktemp("rogue"), "--device", "edge-1")


def _tls(pki, who: str | None = None, ca=None) -> TlsOptions:
    ca = ca or pki
    if who is None:
        return TlsOptions(ca_file=ca / "ca.pem")
    return TlsOptions(ca_file=ca / "ca.pem", cert_file=pki / f"{who}.pem", key_file=pki / f"{who}.key")


def _server_tls(pki, mutual: bool) -> dict:
    out = {"server.tls_cert_file": str(pki / "server.pem"), "server.tls_key_file": str(pki / "server.key")}
    if mutual:
        out["server.tls_client_ca_file"] = str(pki / "ca.pem")
    return out


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises((grpc.RpcError, AdminError)) as info:
        call()
    err = info.value
    if isinstance(err, AdminError):  # the typed admin client's error carries the status name
        return grpc.StatusCode[err.code], str(err)
    return err.code(), err.details() or ""


def _client(address, tls, name, tiny_manifest, **join) -> EdgeTestClient:
    client = EdgeTestClient(address, name, tls=tls)
    client.join(tiny_manifest.weights_sha256, **join)
    return client


# ---------------------------------------------------------------- TLS


def test_tls_serves_tls_only(start, pki, rogue, tiny_manifest):
    server = start(**_server_tls(pki, mutual=False), **{"server.enrollment_secret": SECRET})
    plain = EdgeTestClient(server.address, "edge-1")
    assert _code(lambda: plain.join(tiny_manifest.weights_sha256, enrollment_secret=SECRET))[0] == (
        grpc.StatusCode.UNAVAILABLE)
    untrusting = EdgeTestClient(server.address, "edge-1", tls=_tls(rogue))  # trusts another CA
    assert _code(lambda: untrusting.join(tiny_manifest.weights_sha256, enrollment_secret=SECRET))[0] == (
        grpc.StatusCode.UNAVAILABLE)
    client = _client(server.address, _tls(pki), "laptop", tiny_manifest, enrollment_secret=SECRET)
    assert client.get_task(0.1).WhichOneof("kind") == "wait"
    # TLS alone proves nothing about the device: the enrollment secret is still required.
    anonymous = EdgeTestClient(server.address, "other", tls=_tls(pki))
    assert _code(lambda: anonymous.join(tiny_manifest.weights_sha256))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert status(server.address, _tls(pki)).federation_id
    for c in (plain, untrusting, client, anonymous):
        c.close()


# ---------------------------------------------------------------- mutual TLS


def test_mtls_requires_a_certificate_from_the_ca(start, pki, rogue, tiny_manifest):
    server = start(**_server_tls(pki, mutual=True), **{"server.enrollment_secret": SECRET})
    no_cert = EdgeTestClient(server.address, "edge-1", tls=_tls(pki))
    assert _code(lambda: no_cert.join(tiny_manifest.weights_sha256, enrollment_secret=SECRET))[0] in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
    forged = EdgeTestClient(server.address, "edge-1", tls=TlsOptions(
        ca_file=pki / "ca.pem", cert_file=rogue / "edge-1.pem", key_file=rogue / "edge-1.key"))
    assert _code(lambda: forged.join(tiny_manifest.weights_sha256))[0] in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
    # The certificate enrolls the device: no secret, and an empty name becomes the CN.
    device = _client(server.address, _tls(pki, "edge-1"), "", tiny_manifest)
    assert device.client_id
    assert [c.device_name for c in server.call(server.federation.list_clients)] == ["edge-1"]
    assert device.get_task(0.1).WhichOneof("kind") == "wait"
    for c in (no_cert, forged, device):
        c.close()


def test_mtls_device_name_and_token_must_match_the_certificate(start, pki, tiny_manifest):
    server = start(**_server_tls(pki, mutual=True))
    impostor = EdgeTestClient(server.address, "edge-2", tls=_tls(pki, "edge-1"))
    code, details = _code(lambda: impostor.join(tiny_manifest.weights_sha256))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "edge-1" in details
    one = _client(server.address, _tls(pki, "edge-1"), "edge-1", tiny_manifest)
    two = _client(server.address, _tls(pki, "edge-2"), "edge-2", tiny_manifest)
    two.token = one.token  # edge-1's token replayed over edge-2's connection
    code, details = _code(lambda: two.get_task(0.1))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "belongs to device 'edge-1'" in details
    for c in (impostor, one, two):
        c.close()


def test_mtls_operator_certificate_opens_the_admin_api_only(start, pki, tiny_manifest):
    server = start(**_server_tls(pki, mutual=True), **{"server.admin_token": "adm1n"})
    assert status(server.address, _tls(pki, "operator")).federation_id  # no token needed
    code, details = _code(lambda: status(server.address, _tls(pki, "edge-1")))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "OU=operators" in details
    assert status(server.address, _tls(pki, "edge-1"), token="adm1n").federation_id
    operator = EdgeTestClient(server.address, "operator", tls=_tls(pki, "operator"))
    code, details = _code(lambda: operator.join(tiny_manifest.weights_sha256))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "operator certificate" in details
    operator.close()

    # `rankfed status` speaks mutual TLS with an operator certificate.
    assert main(["status", "--address", server.address, "--tls-ca", str(pki / "ca.pem"),
                 "--tls-cert", str(pki / "operator.pem"), "--tls-key", str(pki / "operator.key"), "--json"]) == 0


def test_mtls_without_admin_token_refuses_device_certificates(start, pki):
    server = start(**_server_tls(pki, mutual=True))
    code, details = _code(lambda: status(server.address, _tls(pki, "edge-2")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "device certificate" in details


# ---------------------------------------------------------------- tokens


def test_tokens_are_not_accepted_across_services(start, tiny_manifest):
    server = start(**{"server.admin_token": "adm1n"})
    device = _client(server.address, None, "dev", tiny_manifest)
    code, details = _code(lambda: status(server.address, token=device.token))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "device session tokens are not accepted" in details
    assert status(server.address, token="adm1n").federation_id
    device.token = "adm1n"
    assert _code(lambda: device.get_task(0.1))[0] == grpc.StatusCode.UNAUTHENTICATED
    device.close()


def test_replayed_tokens_are_refused(start, tmp_path, tiny_manifest):
    server = start()
    device = _client(server.address, None, "dev", tiny_manifest)
    token = device.token
    device.leave()
    code, details = _code(device.get_task)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "left the federation" in details
    # A token from another federation (another signing key) is refused as well.
    from tests.coordinator.harness import CoordinatorThread

    other = CoordinatorThread(make_config(tmp_path / "other"))
    try:
        stranger = EdgeTestClient(other.address, "dev")
        stranger.token = token
        code, details = _code(lambda: stranger.get_task(0.1))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "signature" in details
        stranger.close()
    finally:
        other.stop()
    device.close()


# ---------------------------------------------------------------- loopback rule and helpers


def test_plaintext_is_refused_off_loopback_unless_insecure(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"not loopback and TLS is off.*--insecure"):
        transport_credentials(make_config(tmp_path, **{"server.address": "0.0.0.0:0"}))
    assert transport_credentials(make_config(tmp_path, **{"server.address": "0.0.0.0:0", "server.insecure": True})) is None
    assert transport_credentials(make_config(tmp_path, **{"server.address": "[::1]:0"})) is None
    assert transport_credentials(make_config(tmp_path, **{"server.address": "0.0.0.0:0", **_server_tls(pki, True)}))
    with pytest.raises(ConfigError, match="server.tls_key_file.*not a PEM"):
        transport_credentials(make_config(tmp_path, **{
            "server.tls_cert_file": str(pki / "server.pem"), "server.tls_key_file": str(pki / "ca.srl")}))
    with pytest.raises(ConfigError, match="tls_cert_file and server.tls_key_file: set both"):
        make_config(tmp_path, **{"server.tls_cert_file": str(pki / "server.pem")})


def test_insecure_flag_serves_on_all_interfaces(start):
    server = start(**{"server.address": "0.0.0.0:0", "server.insecure": True})
    assert status(f"127.0.0.1:{server.coordinator.port}").federation_id


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:1", True), ("127.8.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
    ("0.0.0.0:1", False), ("[::]:1", False), ("10.0.0.1:1", False), ("coordinator:1", False),
])
def test_is_loopback_address(address, loopback):
    assert is_loopback_address(address) is loopback


def test_peer_is_loopback():
    assert peer_is_loopback("ipv4:127.0.0.1:5000") and peer_is_loopback("ipv6:[::1]:5000")
    assert not peer_is_loopback("ipv4:10.1.2.3:5000") and not peer_is_loopback("ipv6:[2001:db8::1]:5000")


def test_client_credentials_name_the_bad_file(tmp_path, pki):
    with pytest.raises(TlsError, match="ca_file: cannot read"):
        client_channel_credentials(tmp_path / "missing.pem")
    with pytest.raises(TlsError, match="both cert_file and key_file"):
        TlsOptions(ca_file=pki / "ca.pem", cert_file=pki / "edge-1.pem")
    assert client_channel_credentials(pki / "ca.pem", pki / "edge-1.pem", pki / "edge-1.key")


def test_aio_channel_for_speaks_mtls(start, pki, tiny_manifest):
    import asyncio

    from rankfed.tls import aio_channel_for
    from rankfed.v1 import edge_pb2_grpc

    server = start(**_server_tls(pki, mutual=True))

    async def join() -> str:
        async with aio_channel_for(server.address, _tls(pki, "edge-3")) as channel:
            reply = await edge_pb2_grpc.EdgeServiceStub(channel).Join(
                ProtoEdge.JoinRequest(device_name="", base_model_sha256=tiny_manifest.weights_sha256,
                                      capability=_capability()), timeout=10)
            return reply.client_id

    assert asyncio.run(join())
    channel, stub = admin_stub(server.address, _tls(pki, "operator"))
    with channel:
        names = [c.device_name for c in stub.ListClients(ProtoAdmin.ListClientsRequest(), timeout=10).clients]
    assert names == ["edge-3"]


def _capability():
    from rankfed.v1 import common_pb2 as ProtoCommon

    return ProtoCommon.DeviceCapability(device_class=ProtoCommon.DEVICE_CLASS_CPU, memory_total_bytes=8 * 10**9,
                                        cpu_cores=4, compute_gflops=10.0)


def test_plaintext_health_listener_for_probes_serves_health_only(start, pki, tiny_manifest):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start(**_server_tls(pki, mutual=True), **{"server.health_address": "127.0.0.1:0"})
    port = server.coordinator.health_port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        plain = EdgeTestClient(f"127.0.0.1:{port}", "edge-1")
        assert _code(lambda: plain.join(tiny_manifest.weights_sha256))[0] == grpc.StatusCode.UNIMPLEMENTED
        plain.close()


def test_escaped_comma_in_a_common_name_is_not_an_organizational_unit():
    from rankfed.tls import peer_identity

    context = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"edge-7,OU=operators"],
        "x509_subject": [b"CN=edge-7\\,OU=operators,O=RankFed"],
    }
    identity = peer_identity(context)
    assert identity is not None and not identity.is_operator
    assert identity.common_name == "edge-7,OU=operators"
    genuine = peer_identity({**context, "x509_subject": [b"CN=ops,OU=operators,O=RankFed"]})
    assert genuine is not None and genuine.is_operator


# --------------------------------------------------------------------------- mismatches, explained


def test_transport_mismatches_are_named_in_one_line(start, pki, rogue):
    from rankfed.tls import transport_mismatch

    plain = start()
    assert transport_mismatch(plain.address, None) is None
    assert "does not speak TLS" in transport_mismatch(plain.address, _tls(pki))
    tls = start(**_server_tls(pki, mutual=False))
    assert transport_mismatch(tls.address, _tls(pki)) is None
    assert "speaks TLS and this client plaintext" in transport_mismatch(tls.address, None)
    mutual = start(**_server_tls(pki, mutual=True))
    assert transport_mismatch(mutual.address, _tls(pki, "edge-1")) is None
    assert "requires a client certificate" in transport_mismatch(mutual.address, _tls(pki))
    assert "refused this client's certificate" in transport_mismatch(mutual.address, _tls(rogue, "edge-1", ca=pki))
    assert transport_mismatch("127.0.0.1:1", None) is None  # unreachable: retried elsewhere, not a mismatch


def test_edge_run_fails_fast_on_a_tls_mismatch(start, pki, tmp_path):
    import subprocess
    import sys

    server = start(**_server_tls(pki, mutual=False))
    result = subprocess.run(
        [sys.executable, "-m", "rankfed", "edge", "run", "--coordinator", server.address,
         "--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"), "--retry-for", "300"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "speaks TLS and this client plaintext" in lines[0] and "--tls-ca" in lines[0], lines
