"""Identity without mutual TLS: a device name is bound at its first enrollment to a key only
that device holds; another device cannot take the name over; an operator can free it; a
restarted device rejoins with the key it kept on disk. Over real gRPC."""

from __future__ import annotations

import stat

import grpc
import pytest

from rankfed.coordinator.admin_client import AdminClient
from rankfed.edge_client.credentials import DeviceKeys
from rankfed.edge_client.errors import AuthError
from rankfed.edge_client.transport import EdgeTransport, RetryPolicy
from rankfed.protocol import Capability, DeviceClass, JoinRequest
from tests.coordinator.harness import EdgeTestClient


def _code(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_a_name_is_bound_to_the_first_device(start, tiny_manifest):
    server = start()
    owner, thief = EdgeTestClient(server.address, "dev"), EdgeTestClient(server.address, "dev")
    try:
        first = owner.join(tiny_manifest.weights_sha256)
        assert first.device_key  # issued once, at the first enrollment
        code, details = _code(lambda: thief.join(tiny_manifest.weights_sha256))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "bound to the device that first enrolled it" in details
        code, _ = _code(lambda: thief.join(tiny_manifest.weights_sha256, device_key="guess"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        again = owner.join(tiny_manifest.weights_sha256)  # the owner, with its key
        assert again.client_id == first.client_id and again.device_key == ""
        with AdminClient(server.address) as admin:
            admin.remove_device("dev")  # the operator frees the name
        taken = thief.join(tiny_manifest.weights_sha256)
        assert taken.device_key and taken.device_key != first.device_key
        code, _ = _code(lambda: owner.join(tiny_manifest.weights_sha256))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        owner.close()
        thief.close()


def test_a_restarted_device_rejoins_with_the_key_it_kept(start, tiny_manifest, tmp_path):
    server = start()
    request = JoinRequest(device_name="phone-7", capability=Capability(device_class=DeviceClass.MOBILE),
                          base_model_sha256=tiny_manifest.weights_sha256)
    fast = RetryPolicy(max_elapsed_s=1)
    with EdgeTransport(server.address, keys=DeviceKeys(tmp_path / "keys"), retry=fast) as first:
        joined = first.join(request)
    files = list((tmp_path / "keys").iterdir())
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    with EdgeTransport(server.address, keys=DeviceKeys(tmp_path / "keys"), retry=fast) as restarted:
        assert restarted.join(request).client_id == joined.client_id
    with EdgeTransport(server.address, keys=DeviceKeys(tmp_path / "elsewhere"), retry=fast) as stranger:
        with pytest.raises(AuthError, match="bound"):
            stranger.join(request)
