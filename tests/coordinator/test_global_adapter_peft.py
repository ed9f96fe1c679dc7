"""A global adapter directory written by the coordinator loads with PeftModel.from_pretrained
and reproduces the aggregate's deltas and head."""

from __future__ import annotations

import numpy as np
import pytest

from rankfed.coordinator.export import global_adapter_dir
from tests.coordinator.harness import decode, random_adapter, status, wait_for

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_round_global_loads_with_peft(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 1, "federation.min_clients": 2})
    fleet = clients(server.address, ("laptop", "cpu"), ("phone", "mobile"))
    for i, client in enumerate(fleet):
        task = client.wait_train()
        client.download(task.round)
        client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, i))
    wait_for(lambda: status(server.address).done, what="round")
    directory = global_adapter_dir(server.config.server.data_dir, 1)
    global_adapter = decode((directory / "adapter_model.safetensors").read_bytes())

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, num_labels=3
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    layers = {name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "lora_A")}
    assert set(layers) == set(global_adapter.modules)
    for name, expected in global_adapter.modules.items():
        layer = layers[name]
        a = layer.lora_A["default"].weight.detach().numpy()
        b = layer.lora_B["default"].weight.detach().numpy()
        delta = layer.scaling["default"] * (b @ a)  # (d_out, r) @ (r, d_in)
        np.testing.assert_allclose(delta, expected.delta(global_adapter.use_rslora), rtol=1e-5, atol=1e-6)
    head = model.base_model.model.classifier.modules_to_save["default"]
    np.testing.assert_allclose(head.weight.detach().numpy(), global_adapter.dense["classifier.weight"], rtol=1e-6)
    np.testing.assert_allclose(head.bias.detach().numpy(), global_adapter.dense["classifier.bias"], rtol=1e-6)
