"""What a round does differently in each federation mode: the seam of `EdgeRunner`'s round.

`EdgeRunner` runs every round the same way (download the adapter, heartbeats, train,
evaluate, upload, events); a `RoundStrategy` supplies the parts that depend on the mode:

- `plan`: the step schedule, as phases (one; or pFedLoRA's private then shared phase);
- `model_for`: the model to train, built over the frozen base (or reused) with the
  downloaded adapter loaded;
- `enter_phase` / `end_training`: which parameters train in each phase;
- `update`: the adapter to upload, with its metadata;
- `after_round`: what the device keeps once the round is trained;
- `record_fields`: the mode's extra fields of the round record;
- `release`: drop the model (the runner calls it after each round when its
  `ModelProvider` does not keep models).

`GlobalStrategy` is the rank-heterogeneous mode (one global adapter at the device's rank,
HetLoRA self-pruning); `PersonalizedStrategy` is pFedLoRA (`personal.PersonalModel`).
`strategy_for` is the one place that maps a `FederationMode` to its strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from rankfed.aggregation import Adapter, hetlora_prune_rank, hetlora_tail_norm, truncate
from rankfed.protocol import FederationMode, JoinResult, TrainTask

from .errors import ConfigError
from .model import adapter_from_peft, build_peft_model, load_adapter
from .personal import PersonalModel, PersonalStore, PrivateSettings
from .train import TrainConfig, lora_pairs

EventFn = Callable[[str, dict[str, Any]], None]
# How a personalized round trains its two parts: pFedLoRA alternates (private phase, then
# shared phase); "joint" trains both in one phase (FedPer: the federated part is the body,
# the private part only the head), with the two step counts added.
PersonalSchedule = Literal["alternating", "joint"]
PERSONAL_SCHEDULES: tuple[str, ...] = get_args(PersonalSchedule)


@dataclass(frozen=True)
class RoundContext:
    """One round as a strategy sees it: the task, the current session (client id,
    federation, base model info), this device's base-model digest, the event sink."""

    task: TrainTask
    joined: JoinResult
    base_sha256: str
    emit: EventFn


@dataclass(frozen=True)
class Phase:
    name: str  # handed to `RoundStrategy.enter_phase`
    train: TrainConfig


@dataclass(frozen=True)
class RoundPlan:
    phases: tuple[Phase, ...]
    # The mode's fields of the "task" event (and, for pFedLoRA, of the round record).
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ConfigError("a round plan needs at least one training phase")


@dataclass(frozen=True)
class Update:
    """What leaves the device: the adapter and the metadata stored in its safetensors."""

    adapter: Adapter
    metadata: Mapping[str, str]


class RoundStrategy(Protocol):
    # Names the downloaded adapter in errors: "global" or "shared".
    adapter_kind: str
    # The held-out fraction when neither --eval-data nor --holdout is given.
    default_holdout: float | None

    def plan(self, task: TrainTask, train: TrainConfig) -> RoundPlan: ...

    def model_for(self, base: Any, adapter: Adapter, ctx: RoundContext) -> Any: ...

    def enter_phase(self, name: str) -> None: ...

    def end_training(self) -> None: ...

    def update(self, model: Any, ctx: RoundContext) -> Update: ...

    def after_round(self, scores: Mapping[str, float], ctx: RoundContext) -> None: ...

    def record_fields(self, plan: RoundPlan, scores: Mapping[str, float]) -> dict[str, Any]: ...

    def release(self) -> None: ...


def _structure(adapter: Adapter) -> tuple[Any, ...]:
    return (
        tuple(sorted(adapter.ranks.items())),
        tuple(sorted(adapter.alphas.items())),
        adapter.use_rslora,
        tuple(sorted(adapter.dense)),
    )


class GlobalStrategy:
    """Rank-heterogeneous mode: train the downloaded global adapter at its rank, upload
    all of it (HetLoRA: truncated to a lower rank when the tail penalty shrank the tail)."""

    adapter_kind = "global"
    default_holdout: float | None = None

    def __init__(
        self,
        *,
        hetlora_lambda: float = 0.0,
        hetlora_gamma: float = 0.99,
        hetlora_min_rank: int = 1,
        freeze_below_layer: int | None = None,
    ) -> None:
        """``freeze_below_layer=k``: LoRA on encoder layers >= k only (the federation's
        manifest must list just those layers' modules)."""
        self.hetlora_lambda = hetlora_lambda
        self.freeze_below_layer = freeze_below_layer
        self.hetlora_gamma = hetlora_gamma
        self.hetlora_min_rank = hetlora_min_rank
        self._peft: Any = None
        self._peft_key: tuple[Any, ...] | None = None
        self._tail_before = 0.0

    def plan(self, task: TrainTask, train: TrainConfig) -> RoundPlan:
        return RoundPlan((Phase("train", train),), {"steps": task.local_steps})

    def model_for(self, base: Any, adapter: Adapter, ctx: RoundContext) -> Any:
        """The peft model for ``adapter``'s ranks, rebuilt from the base only when they change."""
        lora = ctx.task.assignment.lora
        key = _structure(adapter) + (tuple(lora.target_modules),)
        if self._peft is None or key != self._peft_key:
            settings = replace(lora, use_rslora=adapter.use_rslora)
            self._peft = build_peft_model(
                base, settings, ctx.joined.base_model.task, ranks=adapter.ranks, alphas=adapter.alphas,
                freeze_below_layer=self.freeze_below_layer,
            )
            self._peft_key = key
            ctx.emit("model", {"ranks": sorted(set(adapter.ranks.values())), "rebuilt": True})
        load_adapter(self._peft, adapter)
        # HetLoRA prunes only if training shrank the tail: remember where it started.
        self._tail_before = self._tail(self._peft) if self.hetlora_lambda > 0 else 0.0
        return self._peft

    def enter_phase(self, name: str) -> None:
        pass  # one phase, every LoRA parameter trains

    def end_training(self) -> None:
        pass

    def update(self, model: Any, ctx: RoundContext) -> Update:
        update = adapter_from_peft(model)
        if self.hetlora_lambda > 0:
            rank = hetlora_prune_rank(
                update.max_rank,
                tail_before=self._tail_before,
                tail_after=self._tail(model),
                gamma=self.hetlora_gamma,
                min_rank=self.hetlora_min_rank,
            )
            if rank < update.max_rank:
                ctx.emit("pruned", {"round": ctx.task.round, "from_rank": update.max_rank, "to_rank": rank})
                update = truncate(update, rank)
        return Update(update, {
            "round": str(ctx.task.round),
            "base_model_sha256": ctx.base_sha256,
            "client_id": ctx.joined.client_id,
        })

    def after_round(self, scores: Mapping[str, float], ctx: RoundContext) -> None:
        pass  # the next round starts from the next global adapter: nothing to keep

    def record_fields(self, plan: RoundPlan, scores: Mapping[str, float]) -> dict[str, Any]:
        return {}

    def release(self) -> None:
        self._peft, self._peft_key = None, None

    def _tail(self, model: Any) -> float:
        return float(sum(
            float(hetlora_tail_norm(a.detach(), b.detach(), gamma=self.hetlora_gamma)) for a, b in lora_pairs(model)
        ))


class PersonalizedStrategy:
    """pFedLoRA: train the private part (shared adapter frozen), then the shared adapter
    (private part frozen); keep the private part on the device (in memory, and in
    ``personal_dir`` when given); upload the shared adapter only."""

    adapter_kind = "shared"
    default_holdout: float | None = 0.2  # the personal accuracy is the mode's metric

    def __init__(
        self,
        *,
        private: PrivateSettings | None = None,
        personal_dir: Path | None = None,
        private_steps: int | None = None,
        shared_steps: int | None = None,
        schedule: PersonalSchedule = "alternating",
    ) -> None:
        if schedule not in PERSONAL_SCHEDULES:
            raise ConfigError(f"personal schedule {schedule!r}: expected one of {PERSONAL_SCHEDULES}")
        self.schedule = schedule
        self.private_settings = private or PrivateSettings()
        self.personal_dir = personal_dir
        self.private_steps = private_steps
        self.shared_steps = shared_steps
        self.personal: PersonalModel | None = None
        # The private part between rounds (survives `release`) and its bookkeeping.
        self.private: Adapter | None = None
        self.info: dict[str, Any] = {}

    def phase_steps(self, task: TrainTask) -> tuple[int, int]:
        """(private steps, shared steps): as configured, else the task's local_steps halved."""
        total = max(2, task.local_steps)
        private = self.private_steps if self.private_steps is not None else (total + 1) // 2
        shared = self.shared_steps if self.shared_steps is not None else total - (total + 1) // 2
        if private < 0 or shared < 0 or private + shared == 0:
            raise ConfigError(f"--private-steps {private} and --shared-steps {shared}: need >= 0 each, > 0 together")
        return private, shared

    def plan(self, task: TrainTask, train: TrainConfig) -> RoundPlan:
        private, shared = self.phase_steps(task)
        if self.schedule == "joint":
            return RoundPlan(
                (Phase("joint", replace(train, steps=private + shared, epochs=None)),),
                {"private_steps": private, "shared_steps": shared, "schedule": "joint"},
            )
        phases = tuple(
            # A different seed per phase, so the two phases do not see the same batches.
            Phase(name, replace(train, steps=steps, epochs=None, seed=train.seed + offset))
            for name, steps, offset in (("private", private, 0), ("shared", shared, 7919))
            if steps > 0
        )
        return RoundPlan(phases, {"private_steps": private, "shared_steps": shared})

    def model_for(self, base: Any, adapter: Adapter, ctx: RoundContext) -> Any:
        """The personal model (built once per shared-adapter shape) holding ``adapter`` and the
        private part: from memory, else from ``personal_dir``, else freshly initialised."""
        shape = (tuple(sorted(adapter.ranks.items())), tuple(sorted(adapter.alphas.items())), adapter.use_rslora)
        if self.personal is None or self.personal.key[:3] != shape:
            self.personal = PersonalModel(
                base, ctx.joined.base_model.task, ctx.task.assignment.lora, adapter, self.private_settings
            )
            ctx.emit("model", {
                "mode": FederationMode.PERSONALIZED.value, "shared": dict(self.personal.shared_map),
                "private_modules": len(self.personal.private_names), "rebuilt": True,
            })
        if self.private is None and self.personal_dir is not None:
            loaded = PersonalStore(self.personal_dir).load(ctx.base_sha256)
            if loaded is not None:
                self.private, self.info = loaded
                ctx.emit("personal_state", {"loaded": str(self.personal_dir), "rounds": self.info.get("rounds", 0)})
        if self.private is None:
            _, self.private = self.personal.split()  # peft's initialisation: B = 0, a fresh head
            self.info = {"rounds": 0, "history": []}
        self.personal.load(adapter, self.private)
        return self.personal.model

    def enter_phase(self, name: str) -> None:
        self._model().set_phase(name)

    def end_training(self) -> None:
        self._model().set_phase("frozen")

    def update(self, model: Any, ctx: RoundContext) -> Update:
        shared, _ = self._model().split()  # only the shared adapter leaves the device
        return Update(shared, {"round": str(ctx.task.round), "client_id": ctx.joined.client_id, "kind": "shared"})

    def after_round(self, scores: Mapping[str, float], ctx: RoundContext) -> None:
        """Keep the trained private part, with the round's held-out scores in its history."""
        personal = self._model()
        _, self.private = personal.split()
        history = list(self.info.get("history", []))[-99:]
        history.append({"round": ctx.task.round, **scores})
        self.info = {
            "base_model_sha256": ctx.base_sha256,
            "federation_id": ctx.joined.federation_id,
            "client_id": ctx.joined.client_id,
            "rounds": int(self.info.get("rounds", 0)) + 1,
            "last_round": ctx.task.round,
            "shared_modules": dict(personal.shared_map),
            "history": history,
        }
        if self.personal_dir is not None:
            PersonalStore(self.personal_dir).save(self.private, self.info)

    def record_fields(self, plan: RoundPlan, scores: Mapping[str, float]) -> dict[str, Any]:
        return {"mode": FederationMode.PERSONALIZED.value, **plan.fields, "eval": dict(scores)}

    def release(self) -> None:
        self.personal = None  # the private part stays in `self.private`

    def _model(self) -> PersonalModel:
        if self.personal is None:
            raise RuntimeError("no personal model: model_for() comes first in a round")
        return self.personal


def strategy_for(
    mode: FederationMode,
    *,
    hetlora_lambda: float = 0.0,
    hetlora_gamma: float = 0.99,
    hetlora_min_rank: int = 1,
    private: PrivateSettings | None = None,
    personal_dir: Path | None = None,
    private_steps: int | None = None,
    shared_steps: int | None = None,
    freeze_below_layer: int | None = None,
    personal_schedule: PersonalSchedule = "alternating",
) -> RoundStrategy:
    """The strategy of a federation mode (from the Join answer), with the device's settings."""
    if mode == FederationMode.PERSONALIZED:
        if freeze_below_layer is not None:
            raise ConfigError("freeze_below_layer is not supported in a personalized federation")
        return PersonalizedStrategy(
            private=private, personal_dir=personal_dir, private_steps=private_steps, shared_steps=shared_steps,
            schedule=personal_schedule,
        )
    return GlobalStrategy(
        hetlora_lambda=hetlora_lambda, hetlora_gamma=hetlora_gamma, hetlora_min_rank=hetlora_min_rank,
        freeze_below_layer=freeze_below_layer,
    )
