from __future__ import annotations

import pytest
import torch

from rankfed.edge_client.data import load_dataset
from rankfed.edge_client.errors import TrainingError
from rankfed.edge_client.model import build_peft_model, load_base_model, load_tokenizer
from rankfed.edge_client.train import TrainConfig, train_local
from rankfed.protocol import LoraSettings

TASK = "sequence-classification"
SETTINGS = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), modules_to_save=("classifier",))


@pytest.fixture(scope="module")
def setup(bert_dir, cls_data):
    base = load_base_model(bert_dir, TASK, num_labels=3)
    ds = load_dataset(cls_data, load_tokenizer(bert_dir), task=TASK, num_labels=3)
    return base, ds


def test_loss_falls_and_is_deterministic(setup):
    base, ds = setup
    cfg = TrainConfig(steps=40, learning_rate=3e-2, batch_size=12, seed=1)
    seen = []
    torch.manual_seed(0)  # peft draws lora_A at build time (in a round it comes from the global)
    r1 = train_local(build_peft_model(base, SETTINGS, TASK), ds, cfg, on_step=seen.append)
    torch.manual_seed(0)
    r2 = train_local(build_peft_model(base, SETTINGS, TASK), ds, cfg)
    assert r1.steps == 40 and [s.step for s in seen] == list(range(1, 41))
    assert r1.losses == r2.losses
    assert sum(r1.losses[-5:]) / 5 < 0.7 * sum(r1.losses[:5]) / 5


def test_epochs_and_should_stop(setup):
    base, ds = setup
    model = build_peft_model(base, SETTINGS, TASK)
    r = train_local(model, ds, TrainConfig(epochs=2, batch_size=16))
    assert r.steps == 2 * 4 and r.examples == 2 * len(ds)
    calls = []
    r = train_local(model, ds, TrainConfig(steps=10), should_stop=lambda: len(calls) >= 3 or calls.append(1) is not None and False)
    assert r.stopped_early and r.steps == 3


def test_hetlora_penalty_shrinks_the_tail(setup):
    from rankfed.aggregation import hetlora_tail_norm
    from rankfed.edge_client.train import lora_pairs

    base, ds = setup
    tails = {}
    for lam in (0.0, 5.0):
        model = build_peft_model(base, SETTINGS, TASK)
        train_local(model, ds, TrainConfig(steps=15, learning_rate=1e-2, seed=0, hetlora_lambda=lam, hetlora_gamma=0.5))
        tails[lam] = sum(float(hetlora_tail_norm(a.detach(), b.detach(), gamma=0.5)) for a, b in lora_pairs(model))
    assert tails[5.0] < tails[0.0]


def test_config_is_validated():
    with pytest.raises(TrainingError, match="exactly one"):
        TrainConfig()
    with pytest.raises(TrainingError, match="exactly one"):
        TrainConfig(steps=1, epochs=1)
