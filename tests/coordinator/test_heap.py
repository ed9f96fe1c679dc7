"""The heap helpers: callable anywhere (no-ops off glibc), nesting, and the threshold put back."""

from __future__ import annotations

import numpy as np

from rankfed.coordinator import heap


def test_mapped_blocks_nest_and_restore(monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(heap, "_set_threshold", seen.append)
    with heap.mapped_blocks():
        with heap.mapped_blocks():
            block = np.zeros(1 << 18, np.float32)  # 1 MiB
        assert seen == [heap.LOW]
    assert seen == [heap.LOW, heap.HIGH]
    del block
    heap.trim()
