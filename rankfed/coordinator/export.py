"""`rankfed coordinator export`: one global adapter out of a coordinator's data directory,
as a directory `PeftModel.from_pretrained` and `rankfed edge export` load as they are.

    rankfed coordinator export --data-dir ./rankfed-data --round last --out final/
    rankfed coordinator export --round best --metric eval_accuracy --out best/

"best" prefers an evaluator's scores of the global adapters on the operator's validation set
(`rankfed edge evaluate`, docs/rank-allocation.md): `--metric eval_accuracy` reads its
"accuracy". Without them it falls back to the devices' own evaluation (the round's metric).
Losses and perplexities count lower as better, every other metric higher.

This is the one answer to "where is the global adapter of round N": nothing else builds
blob paths by hand. It reads the state database and never writes the data directory, so it
is safe beside a running coordinator.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rankfed.coordinator.allocation import lower_is_better
from rankfed.coordinator.errors import ConfigError, NotFoundError
from rankfed.coordinator.models import RoundRecord, ScoreRecord
from rankfed.coordinator.store import BLOB_DIR, STATE_FILE, BlobStore, SqliteStore
from rankfed.coordinator.store.blobs import global_config_relpath, round_dir
from rankfed.protocol import RoundPhase
from rankfed.protocol.artifact import ADAPTER_FILE, PEFT_CONFIG_FILE

EXPORT_INFO_FILE = "rankfed-export.json"


def global_adapter_dir(data_dir: Path | str, round_no: int) -> Path:
    """The directory holding round `round_no`'s global adapter (0: the initial adapter)."""
    return Path(data_dir) / BLOB_DIR / "global" / round_dir(round_no)


@dataclass(frozen=True)
class ExportResult:
    round: int
    chosen_by: str  # how the round was picked, for a person
    out_dir: Path
    sha256: str
    metrics: dict[str, float]


def choose_round(
    rounds: list[RoundRecord], which: str, *, metric: str = "eval_accuracy", scores: Sequence[ScoreRecord] = ()
) -> tuple[RoundRecord, str]:
    """The round `which` names: a number, "last" (the latest DONE round) or "best": the DONE
    round whose global adapter an evaluator scored best (`scores`: validation scores of the
    global adapters; `metric` without its "eval_" prefix), else the one with the best `metric`
    as the devices reported it on their evaluation data."""
    done = [r for r in rounds if r.phase is RoundPhase.DONE]
    if which == "last":
        if not done:
            raise NotFoundError("no round has finished yet: there is no global adapter beyond the initial one")
        return done[-1], "the latest finished round"
    if which == "best":
        sign = -1.0 if lower_is_better(metric) else 1.0
        word = "lowest" if sign < 0 else "highest"
        key = metric.removeprefix("eval_")
        by_round = {s.round: s.metrics[key] for s in scores if not s.client_id and key in s.metrics}
        judged = [r for r in done if r.round in by_round]
        if judged:
            best = max(judged, key=lambda r: (sign * by_round[r.round], r.round))
            return best, f"the {word} {key} ({by_round[best.round]:.4f}) on the evaluator's validation set"
        scored = [r for r in done if metric in r.metrics]
        if not scored:
            raise NotFoundError(
                f"no finished round reports {metric!r}; devices report evaluation metrics with "
                "`rankfed edge run --eval-data FILE` (or an evaluator scores the global adapters: "
                "`rankfed edge evaluate`), or export --round last"
            )
        best = max(scored, key=lambda r: (sign * r.metrics[metric], r.round))
        return best, f"the {word} {metric} ({best.metrics[metric]:.4f}) reported by the devices"
    try:
        number = int(which)
    except ValueError:
        raise ConfigError(f"--round {which!r}: expected a round number, 'last' or 'best'") from None
    match = next((r for r in done if r.round == number), None)
    if match is None:
        finished = ", ".join(str(r.round) for r in done) or "none"
        raise NotFoundError(f"round {number} has no global adapter (finished rounds: {finished})")
    return match, f"round {number} as asked"


def export_global_adapter(data_dir: Path | str, which: str, out: Path | str, *, metric: str = "eval_accuracy") -> ExportResult:
    data_dir, out = Path(data_dir), Path(out)
    if not (data_dir / STATE_FILE).is_file():
        raise ConfigError(f"{data_dir} holds no coordinator state ({STATE_FILE}); pass the coordinator's --data-dir")
    store = SqliteStore(data_dir / STATE_FILE)
    try:
        record, why = choose_round(store.list_rounds(), which, metric=metric, scores=store.list_scores("validation"))
    finally:
        store.close()
    blobs = BlobStore(data_dir / BLOB_DIR)
    source = blobs.path(f"global/{round_dir(record.round)}/{ADAPTER_FILE}")
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if record.global_sha256 and sha != record.global_sha256:
        raise NotFoundError(f"{source} does not match the digest recorded for round {record.round}; restore it from backup")
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_FILE).write_bytes(data)
    shutil.copyfile(blobs.path(global_config_relpath(record.round)), out / PEFT_CONFIG_FILE)
    info = {"round": record.round, "method": record.method, "chosen_by": why, "sha256": sha,
            "metrics": dict(record.metrics)}
    (out / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return ExportResult(round=record.round, chosen_by=why, out_dir=out, sha256=sha, metrics=dict(record.metrics))
