"""HetLoRA's client-side pieces: the tail penalty (numpy and torch autograd) and pruning."""

import numpy as np
import pytest

from rankfed.aggregation import (
    hetlora_prune_rank,
    hetlora_tail_norm,
    hetlora_tail_penalty,
)


def test_tail_penalty_numpy_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 3.0], [4.0, 0.0]])  # r = 3, ⌊0.5·3⌋ = 1: rows 1..2
    b = np.array([[9.0, 0.0, 1.0], [9.0, 2.0, 2.0]])  # columns 1..2: ‖[[0,1],[2,2]]‖ = 3
    assert hetlora_tail_norm(a, b, 0.5) == pytest.approx(5.0 * 3.0)
    assert hetlora_tail_penalty(a, b, gamma=0.5, lam=0.1) == pytest.approx(1.5)


def test_tail_penalty_torch_autograd():
    torch = pytest.importorskip("torch")
    a = torch.randn(8, 5, requires_grad=True)
    b = torch.zeros(6, 8, requires_grad=True)  # fresh LoRA: B = 0, the norm's kink
    loss = hetlora_tail_penalty(a, b, 0.75, 0.01)
    loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    b2 = torch.randn(6, 8, requires_grad=True)
    hetlora_tail_penalty(a, b2, 0.75, 0.01).backward()
    assert b2.grad[:, :6].abs().sum() == 0 and b2.grad[:, 6:].abs().sum() > 0  # only the tail
    expected = 0.01 * np.linalg.norm(b2.detach().numpy()[:, 6:]) * np.linalg.norm(a.detach().numpy()[6:])
    assert float(hetlora_tail_penalty(a, b2, 0.75, 0.01).detach()) == pytest.approx(expected, rel=1e-5)


def test_prune_rank_rule():
    assert hetlora_prune_rank(8, tail_before=2.0, tail_after=1.0, gamma=0.75) == 6
    assert hetlora_prune_rank(8, tail_before=1.0, tail_after=1.0, gamma=0.75) == 8
    assert hetlora_prune_rank(2, tail_before=2.0, tail_after=1.0, gamma=0.4, min_rank=1) == 1
    assert hetlora_prune_rank(4, tail_before=2.0, tail_after=1.0, gamma=0.5, min_rank=3) == 3
    with pytest.raises(ValueError, match="gamma"):
        hetlora_prune_rank(4, tail_before=1, tail_after=0, gamma=1.5)
    with pytest.raises(TypeError, match="unsupported array type"):
        hetlora_tail_norm([[1.0]], [[1.0]])
