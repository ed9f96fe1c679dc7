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


def test_keep_buffers_sets_the_high_threshold_but_not_inside_mapped_blocks(monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(heap, "_set_threshold", seen.append)
    heap.keep_buffers()
    assert seen == [heap.HIGH]
    with heap.mapped_blocks():
        heap.keep_buffers()  # a round's large arrays are being allocated: leave them mapped
        assert seen == [heap.HIGH, heap.LOW]
    assert seen == [heap.HIGH, heap.LOW, heap.HIGH]
    heap.limit_arenas()  # callable anywhere; a no-op off glibc
