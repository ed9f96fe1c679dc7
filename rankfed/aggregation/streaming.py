"""Streaming accumulators: fold client updates one at a time, as they arrive.

``acc = method.accumulator(spec, global_rank=R)``; ``acc.fold(adapter, n_k)`` per upload;
``acc.result()`` gives the same global adapter as the batch rule (to float32 rounding).
No accumulator keeps a reference to a folded adapter (a decoded adapter may be a view of
a whole upload buffer); what each one holds, in float32:

* :class:`ComponentAccumulator` (fedit, zero_pad, hetlora, rbla, replication): per module
  the weighted sums of A (R, d_in) and B~ (d_out, R) plus per-component owner weights,
  i.e. (d_in + d_out) · R · 4 bytes, independent of the number of clients
  (``fill="top"`` replication holds a second such pair).
* :class:`FlexLoraAccumulator`: the stacked weighted factors [w_k B~_k] and [A_k], re-
  compressed exactly (QR + SVD of the core, :mod:`.svd`) whenever the stacked rank
  passes ``max(compress_at, 2 × rank after the last compression)``. The exact rank is at
  most min(d_out, d_in), so memory per module is bounded by
  (d_out + d_in) · (max(compress_at, 2 min(d_out, d_in)) + r_max) · 4 bytes, independent
  of the number of clients. ``compress_at`` defaults to 2 · min(d_out, d_in).
* :class:`FloraAccumulator`: stacking needs every factor, so it holds
  Σ_k r_k (d_in + d_out) · 4 bytes per module: linear in the number of clients.

Weights are data sizes n_k (HetLoRA computes its own norm weights for the LoRA factors
and uses n_k for dense tensors). A fold with weight 0 counts but contributes nothing.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .adapter import Adapter, AdapterSpec
from .dtypes import F32Array
from .errors import AggregationError
from .rules.common import UNOWNED, fill_unowned, global_module
from .rules.padding import FILLS, HETLORA_NORMS, update_norm
from .rules.svd_based import svd_global

__all__ = [
    "Accumulator",
    "ComponentAccumulator",
    "FlexLoraAccumulator",
    "FloraAccumulator",
    "COMPONENT_RULES",
]

COMPONENT_RULES = ("fedit", "zero_pad", "hetlora", "rbla", "replication")


@runtime_checkable
class Accumulator(Protocol):
    """What every accumulator offers."""

    @property
    def count(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def fold(self, adapter: Adapter, weight: float) -> None: ...

    def result(self) -> Adapter: ...


class _Base:
    """Shape checks, dense FedAvg and bookkeeping shared by all accumulators."""

    def __init__(self, spec: AdapterSpec, global_rank: int) -> None:
        if global_rank < 1:
            raise AggregationError(f"global_rank must be >= 1, got {global_rank}")
        self._spec = spec
        self._global_rank = int(global_rank)
        self._count = 0
        self._dense = {n: np.zeros(shape, np.float32) for n, shape in spec.dense.items()}
        self._dense_total = 0.0

    @property
    def count(self) -> int:
        """Number of folds so far (including weight-0 folds)."""
        return self._count

    def _check(self, adapter: Adapter, weight: float, max_rank: int | None) -> float:
        """Structural checks before any state changes, so a rejected fold leaves no trace.
        Values are not scanned for NaN/Inf here (the decoder did; result() checks)."""
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise AggregationError(f"weight must be finite and >= 0, got {weight}")
        spec = self._spec
        if adapter.modules.keys() != spec.modules.keys() or adapter.dense.keys() != spec.dense.keys():
            names = sorted(set(adapter.modules) ^ set(spec.modules) | set(adapter.dense) ^ set(spec.dense))
            raise AggregationError(f"adapter does not match the spec at {names[0]!r}")
        for name, (d_out, d_in) in spec.modules.items():
            module = adapter.modules[name]
            if (module.d_out, module.d_in) != (d_out, d_in) or module.rank < 1:
                raise AggregationError(f"{name}: shape {module.d_out}x{module.d_in} rank {module.rank} "
                                       f"does not fit {d_out}x{d_in}")
            if max_rank is not None and module.rank > max_rank:
                raise AggregationError(f"{name}: rank {module.rank} > global_rank {max_rank}")
        for name, shape in spec.dense.items():
            if adapter.dense[name].shape != shape:
                raise AggregationError(f"{name}: shape {adapter.dense[name].shape}, expected {shape}")
        return weight

    def _fold_dense(self, adapter: Adapter, weight: float) -> None:
        for name, total in self._dense.items():
            total += np.float32(weight) * adapter.dense[name]
        self._dense_total += weight

    def _dense_result(self) -> dict[str, F32Array]:
        if self._dense_total <= 0:
            raise AggregationError("nothing folded with a positive weight")
        return {n: (total / self._dense_total).astype(np.float32) for n, total in self._dense.items()}

    @staticmethod
    def _finite(adapter: Adapter) -> Adapter:
        """Refuse to hand out an aggregate with NaN/Inf (it would replace the global one)."""
        for name, module in adapter.modules.items():
            if not (np.isfinite(module.a).all() and np.isfinite(module.b).all()):
                raise AggregationError(f"{name}: the aggregate is not finite")
        for name, value in adapter.dense.items():
            if not np.isfinite(value).all():
                raise AggregationError(f"{name}: the aggregate is not finite")
        return adapter


class ComponentAccumulator(_Base):
    """Streaming form of fedit, zero_pad, hetlora, rbla and replication (see rules.padding).

    Per module it keeps Σ q_k pad(A_k), Σ q_k pad(B~_k) (q = the rule's LoRA weight),
    the per-component owner weight Σ_{k∈H_i} q_k and the total Σ q_k. Then
    zero_pad/hetlora/fedit divide by the total, RBLA (and replication with owner fill)
    by the owner weight, and top-fill replication adds (total − owner weight) copies of
    the top-rank clients' mean before dividing by the total. ``previous`` is held by
    reference, never copied per fold.
    """

    def __init__(
        self,
        spec: AdapterSpec,
        *,
        rule: str,
        global_rank: int,
        previous: Adapter | None = None,
        unowned: str | None = None,
        norm: str = "client",
        fill: str = "owners",
    ) -> None:
        super().__init__(spec, global_rank)
        if rule not in COMPONENT_RULES:
            raise ValueError(f"rule must be one of {COMPONENT_RULES}, got {rule!r}")
        if unowned is None:
            unowned = {"fedit": "drop", "rbla": "previous", "replication": "previous"}.get(rule, "zero")
        if unowned not in UNOWNED:
            raise ValueError(f"unowned must be one of {UNOWNED}, got {unowned!r}")
        if norm not in HETLORA_NORMS:
            raise ValueError(f"norm must be one of {HETLORA_NORMS}, got {norm!r}")
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        self._rule, self._unowned, self._norm = rule, unowned, norm
        self._top = rule == "replication" and fill == "top"
        self._previous = previous
        R = self._global_rank
        self._a = {n: np.zeros((R, d_in), np.float32) for n, (_, d_in) in spec.modules.items()}
        self._b = {n: np.zeros((d_out, R), np.float32) for n, (d_out, _) in spec.modules.items()}
        self._owner = {n: np.zeros(R) for n in spec.modules}  # float64 weight sums
        self._total = dict.fromkeys(spec.modules, 0.0)
        self._rank_seen: dict[str, int] = {}
        largest = max((R * max(d_out, d_in) for d_out, d_in in spec.modules.values()), default=0)
        self._scratch = np.empty(largest, np.float32)
        if self._top:
            self._top_a = {n: np.zeros_like(a) for n, a in self._a.items()}
            self._top_b = {n: np.zeros_like(b) for n, b in self._b.items()}
            self._top_rank = dict.fromkeys(spec.modules, 0)
            self._top_w = dict.fromkeys(spec.modules, 0.0)

    @property
    def nbytes(self) -> int:
        arrays: list[npt.NDArray[np.floating[Any]]] = [*self._a.values(), *self._b.values(), *self._owner.values(), *self._dense.values(), self._scratch]
        if self._top:
            arrays += [*self._top_a.values(), *self._top_b.values()]
        return int(sum(x.nbytes for x in arrays))

    def _lora_weights(self, adapter: Adapter, weight: float) -> dict[str, float]:
        if self._rule != "hetlora":
            return dict.fromkeys(adapter.modules, weight)
        if weight == 0:
            return dict.fromkeys(adapter.modules, 0.0)
        norms = {
            # ‖s B A‖ = s ‖B A‖: no scaled copy of B needed
            n: update_norm(m.a, m.b) * m.scaling(adapter.use_rslora) for n, m in adapter.modules.items()
        }
        if self._norm == "module":
            return norms
        values = np.fromiter(norms.values(), np.float64)
        client = float(np.sqrt((values**2).sum()) if self._norm == "client" else values.sum())
        return dict.fromkeys(adapter.modules, client)

    def fold(self, adapter: Adapter, weight: float) -> None:
        weight = self._check(adapter, weight, self._global_rank)
        if self._rule == "fedit" and weight > 0:
            for name, module in adapter.modules.items():
                seen = self._rank_seen.get(name, module.rank)
                if module.rank != seen:
                    raise AggregationError(f"fedit needs equal ranks; {name} has {module.rank}, earlier {seen}")
        lora_weights = self._lora_weights(adapter, weight)
        with np.errstate(over="ignore", invalid="ignore"):  # result() refuses non-finite sums
            self._fold_modules(adapter, lora_weights)
            self._fold_dense(adapter, weight)
        self._count += 1

    def _fold_modules(self, adapter: Adapter, lora_weights: dict[str, float]) -> None:
        for name, module in adapter.modules.items():
            q = lora_weights[name]
            if q == 0:
                continue
            r = module.rank
            self._rank_seen[name] = r
            qa = np.float32(q)
            qb = np.float32(q * module.scaling(adapter.use_rslora))
            self._axpy(self._a[name][:r], qa, module.a)  # (r, d_in)
            self._axpy(self._b[name][:, :r], qb, module.b)  # (d_out, r)
            self._owner[name][:r] += q
            self._total[name] += q
            if self._top:
                self._fold_top(name, module.a, module.b, qa, qb, q)

    def _axpy(self, acc: F32Array, q: np.float32, x: F32Array) -> None:
        """acc += q · x through a reused scratch buffer: a fresh temporary per fold would be
        allocated (and, above glibc's mmap threshold, page-faulted) for every module."""
        tmp = self._scratch[: x.size].reshape(x.shape)
        np.multiply(x, q, out=tmp)
        np.add(acc, tmp, out=acc)

    def _fold_top(self, name: str, a: F32Array, b: F32Array, qa: np.float32, qb: np.float32, q: float) -> None:
        """Running sums of the clients at the largest rank seen so far (reset when a larger
        rank arrives): the replication source for fill="top"."""
        r = a.shape[0]
        if r > self._top_rank[name]:
            self._top_a[name][:] = 0
            self._top_b[name][:] = 0
            self._top_rank[name], self._top_w[name] = r, 0.0
        if r == self._top_rank[name]:
            self._axpy(self._top_a[name][:r], qa, a)
            self._axpy(self._top_b[name][:, :r], qb, b)
            self._top_w[name] += q

    def result(self) -> Adapter:
        if self._count == 0:
            raise AggregationError("nothing folded")
        dense = self._dense_result()
        modules = {}
        for name in self._spec.modules:
            total = self._total[name]
            if total <= 0:
                raise AggregationError(f"{name}: no update with a positive weight (hetlora: all norms zero?)")
            owner = self._owner[name]
            owned = int(np.count_nonzero(owner))
            a = self._a[name].astype(np.float64)
            b = self._b[name].astype(np.float64)
            if self._rule in ("rbla", "replication") and not self._top:
                a[:owned] /= owner[:owned, None]
                b[:, :owned] /= owner[None, :owned]
            elif self._top:
                missing = total - owner[:owned]  # weight of the clients that replicate
                top_w = self._top_w[name]
                a[:owned] += missing[:, None] * (self._top_a[name][:owned] / top_w)
                b[:, :owned] += missing[None, :] * (self._top_b[name][:, :owned] / top_w)
                a /= total
                b /= total
            else:
                a /= total
                b /= total
            # float32 now, module by module: the float64 factors of every module at once
            # would be twice the global adapter (the peak of a round's close)
            modules[name] = global_module(*fill_unowned(a, b, owned, name, unowned=self._unowned, previous=self._previous))
            del a, b
        return self._finite(Adapter(modules=modules, dense=dense, use_rslora=False))


class _StackAccumulator(_Base):
    """Keeps weighted copies of the factors, [w_k B~_k] (d_out, r_k) and [A_k] (r_k, d_in)
    (or the weight on A when ``_weight_on_a``)."""

    _weight_on_a = False

    def __init__(self, spec: AdapterSpec, global_rank: int) -> None:
        super().__init__(spec, global_rank)
        self._bs: dict[str, list[F32Array]] = {n: [] for n in spec.modules}
        self._as: dict[str, list[F32Array]] = {n: [] for n in spec.modules}
        self._weight = 0.0

    @property
    def nbytes(self) -> int:
        stacks = sum(x.nbytes for blocks in (*self._bs.values(), *self._as.values()) for x in blocks)
        return int(stacks + sum(x.nbytes for x in self._dense.values()))

    def stacked_rank(self, name: str) -> int:
        return sum(a.shape[0] for a in self._as[name])

    def fold(self, adapter: Adapter, weight: float) -> None:
        weight = self._check(adapter, weight, None)
        with np.errstate(over="ignore", invalid="ignore"):  # result() refuses non-finite sums
            self._fold_stacks(adapter, weight)
            self._fold_dense(adapter, weight)
        self._count += 1

    def _fold_stacks(self, adapter: Adapter, weight: float) -> None:
        if weight > 0:
            for name, module in adapter.modules.items():
                s_k = module.scaling(adapter.use_rslora)
                # new arrays, never views: no reference to the folded adapter is kept
                if self._weight_on_a:
                    self._bs[name].append(np.float32(s_k) * module.b)
                    self._as[name].append(np.float32(weight) * module.a)
                else:
                    self._bs[name].append(np.float32(weight * s_k) * module.b)
                    self._as[name].append(module.a.copy())
                self._after_fold(name)
            self._weight += weight

    def _after_fold(self, name: str) -> None:
        pass

    def _check_nonempty(self) -> None:
        if self._count == 0:
            raise AggregationError("nothing folded")
        if self._weight <= 0:
            raise AggregationError("nothing folded with a positive weight")


class FlexLoraAccumulator(_StackAccumulator):
    """Streaming FlexLoRA: stacked factors while their total rank is below min(d_out, d_in),
    then the dense sum Σ_k w_k s_k B_k A_k (d_out, d_in).

    Memory per module: Σ r_k (d_out + d_in) floats while stacked, d_out·d_in after; never
    more than the stack at the switch. Why switch rather than re-compress the stack by SVD
    each time it grows: once the stacked rank reaches min(d_out, d_in) the dense sum is both
    smaller and exact, and folding into it is one (d_out, r) @ (r, d_in) product instead of
    a QR + SVD per fold (100 MiniLM clients: seconds → tens of milliseconds).
    ``compress_at`` overrides the stacked rank at which the switch happens.
    """

    def __init__(
        self,
        spec: AdapterSpec,
        *,
        global_rank: int,
        previous: Adapter | None = None,
        exact_global: bool = False,
        compress_at: int | None = None,
    ) -> None:
        super().__init__(spec, global_rank)
        self._exact = exact_global
        self._switch_at = {}
        for name, (d_out, d_in) in spec.modules.items():
            at = min(d_out, d_in) if compress_at is None else int(compress_at)
            if at < 1:
                raise ValueError(f"compress_at must be >= 1, got {compress_at}")
            self._switch_at[name] = at
        self._sum: dict[str, F32Array] = {}
        self.compressions = 0

    @property
    def nbytes(self) -> int:
        return super().nbytes + int(sum(x.nbytes for x in self._sum.values()))

    def _after_fold(self, name: str) -> None:
        if name not in self._sum and self.stacked_rank(name) <= self._switch_at[name]:
            return
        d_out, d_in = self._spec.modules[name]
        total = self._sum.get(name)
        if total is None:
            total = self._sum[name] = np.zeros((d_out, d_in), np.float32)
            self.compressions += 1
        for b, a in zip(self._bs[name], self._as[name]):
            total += b @ a  # (d_out, r) @ (r, d_in)
        self._bs[name], self._as[name] = [], []

    def result(self) -> Adapter:
        self._check_nonempty()
        dense = self._dense_result()
        modules = {}
        for name, (_, d_in) in self._spec.modules.items():
            bs, as_ = list(self._bs[name]), list(self._as[name])
            if name in self._sum:
                bs.insert(0, self._sum[name])  # (d_out, d_in) @ I (d_in, d_in)
                as_.insert(0, np.eye(d_in, dtype=np.float32))
            modules[name] = global_module(*svd_global(
                bs, as_, [1.0 / self._weight] * len(bs), None if self._exact else self._global_rank
            ))
        return self._finite(Adapter(modules=modules, dense=dense, use_rslora=False))


class FloraAccumulator(_StackAccumulator):
    """FLoRA stacking: holds every factor (memory Σ_k r_k (d_in + d_out) · 4 bytes/module).

    The weight goes on A, as the paper writes A_g = [p_1 A_1; …; p_K A_K]."""

    _weight_on_a = True

    def __init__(self, spec: AdapterSpec, *, global_rank: int, previous: Adapter | None = None) -> None:
        super().__init__(spec, global_rank)

    def result(self) -> Adapter:
        self._check_nonempty()
        dense = self._dense_result()
        modules = {}
        for name in self._spec.modules:
            a_g = np.concatenate(self._as[name], axis=0).astype(np.float64) / self._weight  # (Σ r_k, d_in)
            b_g = np.concatenate(self._bs[name], axis=1).astype(np.float64)  # (d_out, Σ r_k)
            modules[name] = global_module(a_g, b_g)
        return self._finite(Adapter(modules=modules, dense=dense, use_rslora=False))
