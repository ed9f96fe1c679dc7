"""Issue 11 item 2, over real gRPC: an uploaded adapter must carry the LoRA configuration
it was assigned (alpha, hence scaling, per module; use_rslora; the manifest's modules and
dense tensors; a wire dtype) or it is refused with INVALID_ARGUMENT naming the module and
the field, and leaves no trace. What an honest edge client uploads, including a HetLoRA
update it pruned to a lower rank, is still accepted."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import safetensors.numpy

from rankfed.aggregation import Adapter, LoraModule, encode_adapter, truncate
from rankfed.aggregation.codec import FORMAT, PREFIX, lora_keys
from tests.coordinator.harness import random_adapter, update_files


def _open(start, clients, **overrides):
    """One round open, one client that has downloaded its adapter."""
    server = start(**{"federation.rounds": 2, "federation.min_clients": 1, "federation.clients_per_round": 1,
                      "federation.straggler_grace_seconds": 0.0, **overrides})
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    return server, client, task


def _assigned(manifest, task, seed: int = 0) -> Adapter:
    """An update exactly as assigned: every module at the assigned rank, alpha and use_rslora."""
    lora = task.assignment.lora
    plain = random_adapter(manifest, lora.rank, lora.alpha, seed)
    return Adapter(modules=plain.modules, dense=plain.dense, use_rslora=lora.use_rslora)


def _with_alpha(adapter: Adapter, name: str, alpha: float) -> Adapter:
    module = adapter.modules[name]
    modules = {**adapter.modules, name: LoraModule(a=module.a, b=module.b, alpha=alpha)}
    return Adapter(modules=modules, dense=adapter.dense, use_rslora=adapter.use_rslora)


def _refused(call, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


def _then_accepted(server, client, task, adapter: Adapter) -> None:
    """The refused upload left nothing behind, and a correct one still counts."""
    assert update_files(server.config.server.data_dir) == []
    assert client.upload(task.round, adapter).bytes_received > 0


MODULE = "bert.encoder.layer.1.attention.self.value"


def test_an_update_with_1000x_the_assigned_alpha_is_refused(start, clients, tiny_manifest):
    """The attack of issue 11: the same factors, alpha × 1000, would make the update 1000×."""
    server, client, task = _open(start, clients)
    good = _assigned(tiny_manifest, task)
    forged = _with_alpha(good, MODULE, task.assignment.lora.alpha * 1000)
    details = _refused(lambda: client.upload(task.round, forged), MODULE, "lora_alpha")
    assert f"lora_alpha {task.assignment.lora.alpha:g}" in details  # what to send instead
    _then_accepted(server, client, task, good)


def test_an_alpha_slightly_off_is_refused(start, clients, tiny_manifest):
    """Only float rounding is tolerated (1e-6 relative), not a 1% boost."""
    server, client, task = _open(start, clients)
    good = _assigned(tiny_manifest, task)
    _refused(lambda: client.upload(task.round, _with_alpha(good, MODULE, task.assignment.lora.alpha * 1.01)),
             MODULE, "lora_alpha")
    _then_accepted(server, client, task, good)


@pytest.mark.parametrize("rule", ["constant_scaling", "rslora"])
def test_use_rslora_other_than_assigned_is_refused(start, clients, tiny_manifest, rule):
    server, client, task = _open(start, clients, **{"lora.alpha_rule": rule})
    good = _assigned(tiny_manifest, task)
    assert good.use_rslora == (rule == "rslora")
    flipped = Adapter(modules=good.modules, dense=good.dense, use_rslora=not good.use_rslora)
    _refused(lambda: client.upload(task.round, flipped), "use_rslora")
    _then_accepted(server, client, task, good)


@pytest.mark.parametrize("rule", ["constant_scaling", "fixed", "rslora"])
def test_a_hetlora_update_pruned_by_the_edge_client_rule_is_accepted(start, clients, tiny_manifest, rule):
    """HetLoRA's self-pruning (edge client: GlobalStrategy.update -> truncate) keeps the
    first r components and the scaling, alpha = s * r (s * sqrt(r) with rsLoRA). That is
    accepted under every alpha rule; the pruned factors with the assigned alpha (a
    different scaling) are not."""
    server, client, task = _open(start, clients, **{"federation.method": "hetlora", "lora.alpha_rule": rule})
    assigned = task.assignment.lora.rank
    assert assigned >= 2
    pruned = truncate(_assigned(tiny_manifest, task), assigned // 2)
    same_alpha = Adapter(
        modules={n: LoraModule(a=m.a, b=m.b, alpha=task.assignment.lora.alpha) for n, m in pruned.modules.items()},
        dense=pruned.dense, use_rslora=pruned.use_rslora,
    )
    _refused(lambda: client.upload(task.round, same_alpha), "lora_alpha", f"pruned from {assigned}")
    _then_accepted(server, client, task, pruned)


def test_a_missing_or_extra_dense_tensor_is_refused(start, clients, tiny_manifest):
    """modules_to_save: exactly the manifest's dense tensors (classifier.weight, .bias)."""
    server, client, task = _open(start, clients)
    good = _assigned(tiny_manifest, task)
    missing = Adapter(modules=good.modules, dense={"classifier.weight": good.dense["classifier.weight"]})
    _refused(lambda: client.upload(task.round, missing), "classifier.bias")
    extra = Adapter(modules=good.modules, dense={**good.dense, "pooler.dense.weight": np.ones((8, 8), np.float32)})
    _refused(lambda: client.upload(task.round, extra), "pooler.dense.weight")
    _then_accepted(server, client, task, good)


def test_a_missing_target_module_is_refused(start, clients, tiny_manifest):
    server, client, task = _open(start, clients)
    good = _assigned(tiny_manifest, task)
    modules = {n: m for n, m in good.modules.items() if n != MODULE}
    _refused(lambda: client.upload(task.round, Adapter(modules=modules, dense=good.dense)), MODULE)
    _then_accepted(server, client, task, good)


def test_a_dtype_outside_the_wire_dtypes_is_refused(start, clients, tiny_manifest):
    """float64 (or any dtype but F32, F16, BF16) is refused naming the tensor."""
    server, client, task = _open(start, clients)
    good = _assigned(tiny_manifest, task)
    tensors: dict[str, np.ndarray] = {}
    for name, module in good.modules.items():
        key_a, key_b = lora_keys(name)
        tensors[key_a], tensors[key_b] = module.a.astype(np.float64), module.b
    for name, value in good.dense.items():
        tensors[PREFIX + name] = value
    data = safetensors.numpy.save(tensors, metadata={
        "format": FORMAT, "ranks": json.dumps(good.ranks), "alphas": json.dumps(good.alphas), "use_rslora": "false",
    })
    _refused(lambda: client.upload_bytes(task.round, good.max_rank, data), "F64", "lora_A")
    _then_accepted(server, client, task, good)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_half_precision_wire_dtypes_are_accepted(start, clients, tiny_manifest, dtype):
    """The edge client's --upload-dtype choices all pass the checks."""
    server, client, task = _open(start, clients)
    good = _assigned(tiny_manifest, task)
    data = encode_adapter(good, dtype=dtype)
    assert client.upload_bytes(task.round, good.max_rank, data).bytes_received == len(data)
