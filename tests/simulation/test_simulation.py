"""The in-process simulation runs the real Federation and EdgeRunner code: on a tiny model it
gives the same global adapters as real gRPC (a served coordinator, EdgeTransport clients)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rankfed.aggregation import decode_adapter
from rankfed.coordinator.config import load_config
from rankfed.edge_client.errors import AuthError
from rankfed.edge_client.runner import RunnerConfig
from rankfed.simulation.engine import (
    PROFILE_RANK,
    PROFILES,
    SimClient,
    SimConfig,
    coordinator_overrides,
    run_simulation,
    write_manifest,
)
from rankfed.simulation.host import FederationHost
from rankfed.simulation.transport import InProcessTransport
from tests.edge_client.conftest import make_bert_dir, write_cls_data

from .grpc_path import run_over_grpc

LABELS = ("negative", "positive", "sport")
PROFILE_NAMES = ("cuda-large", "cpu", "mobile")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    model = make_bert_dir(root / "model")
    data = [write_cls_data(root / f"c{i}.jsonl", n=24 + 6 * i, seed=i) for i in range(3)]
    return model, data


def _cfg(method: str) -> SimConfig:
    return SimConfig(method=method, rounds=2, local_steps=3, batch_size=4, learning_rate=1e-2, max_length=16, seed=5)


def _runner_config(model: Path, data: Path, name: str, cfg: SimConfig) -> RunnerConfig:
    return RunnerConfig(model_dir=model, data_path=data, device_name=name, label_names=LABELS,
                        max_length=cfg.max_length, max_wait_s=2.0, rejoin_on_bandwidth_change=False)


def _grpc_run(model: Path, data: list[Path], cfg: SimConfig, work: Path) -> Path:
    """The real path: a grpc.aio coordinator on 127.0.0.1:0 and EdgeRunners over EdgeTransport."""
    manifest = write_manifest(model, work / "manifest.json", num_labels=3, target_modules=cfg.target_modules)
    config = load_config(None, overrides=coordinator_overrides(cfg, data_dir=work / "coordinator",
                                                               manifest=manifest, num_clients=len(data)))
    run_over_grpc(config, [(_runner_config(model, data[i], f"client-{i}", cfg), PROFILES[PROFILE_NAMES[i]])
                           for i in range(len(data))])
    return work / "coordinator" / "blobs" / "global" / f"round-{cfg.rounds:06d}" / "adapter_model.safetensors"


@pytest.mark.parametrize("method", ["rbla", "zero_pad"])
def test_simulation_equals_the_grpc_path(tiny, tmp_path, method):
    model, data = tiny
    cfg = _cfg(method)
    clients = [SimClient(f"client-{i}", PROFILE_NAMES[i], p) for i, p in enumerate(data)]
    seen = []
    sim = run_simulation(model, clients, cfg, work_dir=tmp_path / "sim", label_names=LABELS, on_round=seen.append)
    assert [r.phase for r in sim.rounds] == ["done", "done"]
    assert [r.ranks for r in seen] == [sorted(PROFILE_RANK[p] for p in PROFILE_NAMES)] * 2 == [[2, 4, 16]] * 2
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in sim.rounds)

    real = _grpc_run(model, data, cfg, tmp_path / "grpc")
    a = decode_adapter(Path(sim.final_global_path).read_bytes())
    b = decode_adapter(real.read_bytes())
    assert a.ranks == b.ranks and sorted(a.dense) == sorted(b.dense)
    moved = False
    for name, mod in a.modules.items():
        # Products, not factors (SVD signs); only float summation order may differ.
        np.testing.assert_allclose(mod.delta(), b.modules[name].delta(), rtol=1e-4, atol=1e-6)
        moved |= bool(np.abs(mod.delta()).max() > 1e-4)
    for name, value in a.dense.items():
        np.testing.assert_allclose(value, b.dense[name], rtol=1e-4, atol=1e-6)
    assert moved  # training changed the adapter, so the comparison means something


def test_in_process_transport_maps_errors_like_grpc(tiny, tmp_path):
    model, _ = tiny
    cfg = _cfg("rbla")
    manifest = write_manifest(model, tmp_path / "manifest.json", num_labels=3, target_modules=cfg.target_modules)
    config = load_config(None, overrides=coordinator_overrides(cfg, data_dir=tmp_path / "c", manifest=manifest,
                                                               num_clients=2))
    with FederationHost(config) as host:
        transport = InProcessTransport(host)
        with pytest.raises(AuthError, match="UNAUTHENTICATED"):
            transport.get_task(0.1)


def _max_delta(path: str) -> float:
    adapter = decode_adapter(Path(path).read_bytes())
    return max(float(np.abs(m.delta()).max()) for m in adapter.modules.values())


@pytest.mark.parametrize("method", ["flexlora", "flora"])
def test_svd_redistribution_rules_train_the_lora_factors(tiny, tmp_path, method):
    """SVD redistribution of the initial global adapter (B = 0) gives A = B = 0; the
    coordinator revives such components (rankfed.aggregation.revive_inert), so the LoRA
    factors train and the final global delta is not zero."""
    model, data = tiny
    clients = [SimClient(f"client-{i}", PROFILE_NAMES[i], p) for i, p in enumerate(data)]
    sim = run_simulation(model, clients, _cfg(method), work_dir=tmp_path, label_names=LABELS)
    assert _max_delta(sim.final_global_path) > 1e-4


def test_simulated_devices_score_their_eval_files(tiny, tmp_path):
    """Devices share the provider's base model and still read --eval-data (the old
    simulation-only copy of the runner's set-up had dropped it)."""
    model, data = tiny
    held = [write_cls_data(tmp_path / f"held{i}.jsonl", n=8, seed=20 + i) for i in range(2)]
    clients = [SimClient(f"client-{i}", PROFILE_NAMES[i], data[i], eval_path=held[i]) for i in range(2)]
    cfg = SimConfig(method="rbla", rounds=1, local_steps=2, batch_size=4, max_length=16, seed=5)
    sim = run_simulation(model, clients, cfg, work_dir=tmp_path / "sim", label_names=LABELS)
    (report,) = sim.rounds
    assert [sorted(c["eval"]) for c in report.clients] == [["accuracy", "loss"]] * 2


def test_frozen_layer_cache_through_the_coordinator(tiny, tmp_path):
    """freeze_below_layer end to end: the manifest lists the top layer's modules only, the
    devices train them from cached states, the coordinator aggregates them."""
    model, data = tiny
    clients = [SimClient(f"client-{i}", PROFILE_NAMES[i], data[i]) for i in range(2)]
    cfg = SimConfig(method="rbla", rounds=2, local_steps=3, batch_size=4, learning_rate=1e-2, max_length=16,
                    seed=5, freeze_below_layer=1)
    sim = run_simulation(model, clients, cfg, work_dir=tmp_path / "sim", label_names=LABELS)
    assert len(sim.rounds) == 2 and all(len(r.clients) == 2 for r in sim.rounds)
    final = decode_adapter(Path(sim.final_global_path).read_bytes())
    assert final.modules and all(".layer.1." in name for name in final.modules)
    assert _max_delta(sim.final_global_path) > 1e-4
