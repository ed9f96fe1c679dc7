"""Backends: a worker process killed mid-round costs the devices it held (error outcomes,
dropped for the round) and is replaced; on Ray (2 CPUs, in CI) a fleet runs its rounds on
actors that load the model from the object store."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from rankfed.simulation.backends import ProcessBackend, slot_of
from rankfed.simulation.fleet import load_fleet
from rankfed.simulation.population import build_population
from rankfed.simulation.workers import TrainJob, WorkerSettings

from .test_simulate import _settings, tiny  # noqa: F401 - the module fixture


def _jobs(model, data, tmp_path, n):
    """n training jobs of round 1, as the driver makes them (a real coordinator answers)."""
    from rankfed.coordinator.config import load_config
    from rankfed.edge_client.model import weights_sha256
    from rankfed.protocol import JoinRequest, TrainTask
    from rankfed.simulation.driver import coordinator_settings
    from rankfed.simulation.engine import write_manifest
    from rankfed.simulation.host import FederationHost
    from rankfed.simulation.profiles import PROFILES
    from rankfed.simulation.transport import InProcessTransport

    fleet = load_fleet(None, _settings(model, data, **{"devices.count": n, "federation.participation": n,
                                                       "training.local_steps": 300}))
    pop = build_population(fleet)
    manifest = write_manifest(model, tmp_path / "m.json", num_labels=3, target_modules=("query", "value"))
    config = load_config(None, overrides=coordinator_settings(fleet, data_dir=tmp_path / "c", manifest=manifest))
    sha = weights_sha256(model)
    jobs = []
    with FederationHost(config) as host:
        host.call(host.fed().pause, "test", "joining")  # round 1 selects from all of them
        links = []
        for d in pop.devices:
            link = InProcessTransport(host)
            joined = link.join(JoinRequest(device_name=d.name, capability=PROFILES[d.profile],
                                           base_model_sha256=sha, num_examples=d.num_examples))
            links.append((d, link, joined))
        host.call(host.fed().resume, "test", "joined")
        for d, link, joined in links:
            for _ in range(200):
                task = link.get_task(0.5)
                if isinstance(task, TrainTask):
                    break
            manifest_, blob = link.download(task.round, expected_sha256=task.adapter_sha256)
            jobs.append(TrainJob(d.name, d.data, joined, task, manifest_, blob))
    settings = WorkerSettings(model_dir=str(model), label_names=pop.label_names, max_length=16, base_sha256=sha)
    return jobs, settings


def test_a_killed_worker_process_drops_its_devices_and_is_replaced(tiny, tmp_path):  # noqa: F811
    model, data = tiny
    jobs, settings = _jobs(model, data, tmp_path, 6)
    backend = ProcessBackend(settings, 2)
    try:
        pids = [w["pid"] for w in backend.stats()]
        victim = pids[slot_of(jobs[0].device, 2)]  # the process that trains the first device

        def kill_soon() -> None:
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        outcomes = backend.train(jobs)
        killer.join()
        lost = [o for o in outcomes if o.error]
        assert lost and all("worker lost" in o.error for o in lost)
        for o in outcomes:  # the other process's devices trained
            if slot_of(o.device, 2) != slot_of(jobs[0].device, 2):
                assert o.header is not None, o.error
        after = backend.train(jobs[:2])  # a new process took the dead one's place
        assert all(o.header is not None for o in after), [o.error for o in after]
        assert victim not in [w["pid"] for w in backend.stats()]
    finally:
        backend.close()


def test_ray_backend_runs_a_small_fleet(tiny, tmp_path):  # noqa: F811
    pytest.importorskip("ray")
    from rankfed.simulation.driver import simulate

    model, data = tiny
    fleet = load_fleet(None, _settings(model, data, **{"backend.kind": "ray", "backend.workers": 2,
                                                       "backend.num_cpus": 1.0}))
    result = simulate(fleet, tmp_path / "ray", progress=None)
    lines = [json.loads(x) for x in (tmp_path / "ray" / "rounds.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["done", "done"]
    assert all(x["uploaded"] == 4 for x in lines)
    workers = result.summary["workers"]
    assert len(workers) == 2 and all(w["pid"] != os.getpid() for w in workers)
    assert 0.0 <= result.summary["final"]["test"]["accuracy"] <= 1.0
