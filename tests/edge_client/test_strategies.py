"""The runner's seams: a `ModelProvider` supplies the base model and decides whether peft
models live between rounds; a `RoundStrategy` supplies the mode-specific parts of a round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from rankfed.aggregation import AdapterSpec, read_adapter_metadata
from rankfed.edge_client.errors import ConfigError
from rankfed.edge_client.manifest import build_manifest
from rankfed.edge_client.model import weights_sha256
from rankfed.edge_client.provider import DiskModelProvider
from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
from rankfed.edge_client.strategies import (
    GlobalStrategy,
    PersonalizedStrategy,
    RoundContext,
    RoundPlan,
    Update,
    strategy_for,
)
from rankfed.edge_client.train import TrainConfig
from rankfed.protocol import Capability, DoneTask, FederationMode, TrainTask
from tests.edge_client.conftest import write_cls_data
from tests.edge_client.test_runner import FakeTransport, _train


@pytest.fixture(scope="module")
def spec_and_sha(bert_dir):
    m = build_manifest(bert_dir, task="sequence-classification", num_labels=3, target_modules=("query", "value"))
    return AdapterSpec(modules=m["modules"], dense=m["dense"]), weights_sha256(bert_dir)


def _fake(spec_and_sha, tasks: list) -> FakeTransport:
    spec, sha = spec_and_sha
    transport = FakeTransport(spec, sha, tasks)
    transport._all = [t for t in tasks if isinstance(t, TrainTask)]
    return transport


def _run(bert_dir, data, transport, **kw) -> tuple[Any, list[tuple[str, dict]]]:
    runner_kw = {k: kw.pop(k) for k in ("models", "strategy") if k in kw}
    events: list[tuple[str, dict]] = []
    config = RunnerConfig(model_dir=bert_dir, data_path=data, device_name="dev", **kw)
    runner = EdgeRunner(transport, config, on_event=lambda n, f: events.append((n, f)),
                        capability=Capability(cpu_cores=2), **runner_kw)
    return runner.run(), events


class CountingProvider(DiskModelProvider):
    """The default provider, counting what the runner asks of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[str, int]] = []
        self.given: list[Any] = []

    def base_model(self, task: str, num_labels: int) -> Any:
        self.asked.append((task, num_labels))
        self.given.append(super().base_model(task, num_labels))
        return self.given[-1]


@pytest.mark.parametrize("keep", [True, False])
def test_provider_supplies_the_base_and_decides_whether_models_live(bert_dir, cls_data, spec_and_sha, keep):
    provider = CountingProvider(bert_dir, keep_model=keep)
    transport = _fake(spec_and_sha, [_train(1, 4, steps=2), _train(2, 4, steps=2), DoneTask(final_round=2)])
    summary, events = _run(bert_dir, cls_data, transport, models=provider)
    assert [r["round"] for r in summary.rounds] == [1, 2]
    assert provider.asked == [("sequence-classification", 3)]  # loaded once, not per round
    # Same rank both rounds: a kept model is reused, a dropped one is rebuilt.
    assert sum(1 for n, _ in events if n == "model") == (1 if keep else 2)


def test_two_runners_share_one_base_model(bert_dir, cls_data, spec_and_sha):
    provider = CountingProvider(bert_dir, keep_model=False)
    for _ in range(2):
        _run(bert_dir, cls_data, _fake(spec_and_sha, [_train(1, 2, steps=1), DoneTask(final_round=1)]), models=provider)
    assert len(provider.given) == 2 and provider.given[0] is provider.given[1]


def test_eval_file_is_used_with_a_shared_provider(bert_dir, cls_data, spec_and_sha, tmp_path):
    """The simulation's configuration (shared provider, models dropped) keeps --eval-data,
    which its old copy of the set-up had lost."""
    held = write_cls_data(tmp_path / "held.jsonl", n=12, seed=9)
    transport = _fake(spec_and_sha, [_train(1, 4, steps=2), DoneTask(final_round=1)])
    _, events = _run(bert_dir, cls_data, transport, models=DiskModelProvider(bert_dir, keep_model=False),
                     eval_path=held)
    header, _ = transport.uploads[0]
    assert set(header.metrics.eval) == {"accuracy", "loss"}
    assert header.num_examples == 60 and not any(n == "holdout" for n, _ in events)


class Recording(GlobalStrategy):
    """The global strategy, recording the hooks the runner calls and adding a field."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def plan(self, task: TrainTask, train: TrainConfig) -> RoundPlan:
        self.calls.append("plan")
        return super().plan(task, train)

    def model_for(self, base: Any, adapter: Any, ctx: RoundContext) -> Any:
        self.calls.append("model_for")
        return super().model_for(base, adapter, ctx)

    def enter_phase(self, name: str) -> None:
        self.calls.append(f"enter_phase:{name}")

    def end_training(self) -> None:
        self.calls.append("end_training")

    def update(self, model: Any, ctx: RoundContext) -> Update:
        self.calls.append("update")
        up = super().update(model, ctx)
        return Update(up.adapter, {**up.metadata, "kind": "recorded"})

    def after_round(self, scores: Mapping[str, float], ctx: RoundContext) -> None:
        self.calls.append("after_round")

    def record_fields(self, plan: RoundPlan, scores: Mapping[str, float]) -> dict[str, Any]:
        self.calls.append("record_fields")
        return {"strategy": "recorded"}

    def release(self) -> None:
        self.calls.append("release")
        super().release()


def test_a_given_strategy_runs_the_round(bert_dir, cls_data, spec_and_sha):
    strategy = Recording()
    transport = _fake(spec_and_sha, [_train(1, 4, steps=2), DoneTask(final_round=1)])
    summary, _ = _run(bert_dir, cls_data, transport, strategy=strategy, models=DiskModelProvider(bert_dir, keep_model=False))
    assert strategy.calls == ["plan", "model_for", "enter_phase:train", "end_training", "update", "after_round",
                              "record_fields", "release"]
    assert summary.rounds[0]["strategy"] == "recorded"
    _, blob = transport.uploads[0]
    meta = read_adapter_metadata(blob)  # the codec adds its own keys (format, ranks, alphas, ...)
    assert {k: meta[k] for k in ("round", "base_model_sha256", "client_id", "kind")} == {
        "round": "1", "base_model_sha256": spec_and_sha[1], "client_id": "c-7", "kind": "recorded"}


def test_the_mode_picks_the_strategy():
    assert isinstance(strategy_for(FederationMode.RANK_HETEROGENEOUS), GlobalStrategy)
    personal = strategy_for(FederationMode.PERSONALIZED, private_steps=3)
    assert isinstance(personal, PersonalizedStrategy) and personal.private_steps == 3
    assert strategy_for(FederationMode.RANK_HETEROGENEOUS).default_holdout is None and personal.default_holdout == 0.2


def test_personalized_plan_alternates_phases():
    train = TrainConfig(steps=5, learning_rate=0.01, batch_size=4, seed=10)
    plan = PersonalizedStrategy().plan(_train(1, 2, steps=5), train)
    assert [(p.name, p.train.steps, p.train.seed) for p in plan.phases] == [("private", 3, 10), ("shared", 2, 10 + 7919)]
    assert plan.fields == {"private_steps": 3, "shared_steps": 2}
    only_shared = PersonalizedStrategy(private_steps=0, shared_steps=4).plan(_train(1, 2), train)
    assert [p.name for p in only_shared.phases] == ["shared"]
    with pytest.raises(ConfigError, match="> 0 together"):
        PersonalizedStrategy(private_steps=0, shared_steps=0).plan(_train(1, 2), train)
    global_plan = GlobalStrategy().plan(_train(1, 2, steps=5), train)
    assert [p.train for p in global_plan.phases] == [train] and global_plan.fields == {"steps": 5}


def test_personalized_joint_schedule_is_one_phase_of_both_step_counts():
    train = TrainConfig(steps=5, learning_rate=0.01, batch_size=4, seed=10)
    plan = PersonalizedStrategy(private_steps=3, shared_steps=4, schedule="joint").plan(_train(1, 2), train)
    assert [(p.name, p.train.steps, p.train.seed) for p in plan.phases] == [("joint", 7, 10)]
    assert plan.fields == {"private_steps": 3, "shared_steps": 4, "schedule": "joint"}
    joint = strategy_for(FederationMode.PERSONALIZED, personal_schedule="joint")
    assert isinstance(joint, PersonalizedStrategy) and joint.schedule == "joint"
    with pytest.raises(ConfigError, match="personal schedule 'both'"):
        PersonalizedStrategy(schedule="both")  # type: ignore[arg-type]
