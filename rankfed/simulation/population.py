"""The virtual devices of a fleet, as data: who has which profile, which examples, how noisy.

A pure function of the fleet and its seed (numpy PCG64):
1. From the corpus, a stratified global test set and validation set are held out first.
2. A training pool of ``count * examples_per_device`` examples is drawn from the rest.
3. The quality tier (``quality_fraction`` of the devices, chosen at random) gets IID samples
   of ``examples_per_device`` each with clean labels: near-balanced label histograms.
4. The other devices split what is left by Dirichlet(``dirichlet_alpha``) label skew, and
   ``label_noise`` of their labels are flipped to another class.
5. Profiles (hence capability ranks) follow the fractions of ``devices.profiles``; with
   ``assignment = "aligned"`` the highest-rank profiles go to the quality tier first, with
   ``"anti-aligned"`` the lowest-rank ones do, with ``"random"`` chance decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankfed.datasets import DemoDataError, TextCorpus, dirichlet_split, holdout_split, load_corpus

from .fleet import Fleet, FleetError
from .profiles import PROFILE_RANK


@dataclass(frozen=True)
class VirtualDevice:
    """One simulated device: its name, profile and training data (JSONL bytes)."""

    name: str
    profile: str
    quality: bool  # in the quality tier (balanced, clean labels)
    data: bytes  # one {"text", "label"} JSON object per line
    num_examples: int
    noisy_labels: int  # labels flipped by the label-noise setting
    eval_data: bytes | None = None  # the device's own held-out file (its metrics.eval), if any


@dataclass(frozen=True)
class Population:
    devices: tuple[VirtualDevice, ...]
    validation: bytes  # the global validation set, JSONL
    test: bytes  # the global test set, JSONL
    label_names: tuple[str, ...]

    def summary(self) -> dict[str, object]:
        sizes = [d.num_examples for d in self.devices]
        profiles: dict[str, int] = {}
        for d in self.devices:
            profiles[d.profile] = profiles.get(d.profile, 0) + 1
        return {
            "devices": len(self.devices),
            "examples": {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes), "total": sum(sizes)},
            "profiles": profiles,
            "quality_tier": sum(d.quality for d in self.devices),
            "noisy_labels": sum(d.noisy_labels for d in self.devices),
            "validation": self.validation.count(b"\n"),
            "test": self.test.count(b"\n"),
            "labels": len(self.label_names),
        }


def read_corpus(dataset: str) -> TextCorpus:
    """A bundled corpus by name, or a JSONL file of {"text", "label"} objects."""
    path = Path(dataset)
    if dataset.endswith(".jsonl") or path.is_file():
        if not path.is_file():
            raise FleetError(f"data.dataset {dataset} does not exist")
        texts, raw = [], []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                raw.append(str(row["label"]))
            except (ValueError, KeyError, TypeError):
                raise FleetError(f"{dataset}: line {i + 1} is not a JSON object with text and label") from None
        names = tuple(sorted(set(raw)))
        if len(names) < 2:
            raise FleetError(f"{dataset}: needs at least two labels, found {len(names)}")
        return TextCorpus(tuple(texts), np.array([names.index(x) for x in raw], dtype=np.int64), names)
    try:
        return load_corpus(dataset)
    except DemoDataError as exc:
        raise FleetError(str(exc)) from None


def _jsonl(corpus: TextCorpus, index: np.ndarray, labels: np.ndarray | None = None) -> bytes:
    labels = corpus.labels[index] if labels is None else labels
    names = corpus.label_names
    return "".join(
        json.dumps({"text": corpus.texts[i], "label": names[int(y)]}) + "\n" for i, y in zip(index, labels, strict=True)
    ).encode()


def _counts(fractions: dict[str, float], n: int) -> dict[str, int]:
    """Largest-remainder rounding of ``fractions`` of ``n`` (ties by profile name)."""
    raw = {k: v * n for k, v in fractions.items()}
    out = {k: int(np.floor(v)) for k, v in raw.items()}
    left = n - sum(out.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def build_population(fleet: Fleet) -> Population:
    d, data = fleet.devices, fleet.data
    corpus = read_corpus(data.dataset)
    rng = np.random.default_rng([fleet.seed, 7])
    n_classes = len(corpus.label_names)
    held = data.validation_examples + data.test_examples
    need = held + d.count * data.examples_per_device
    if need > len(corpus):
        raise FleetError(
            f"data.dataset {data.dataset} has {len(corpus)} examples; {d.count} devices x "
            f"{data.examples_per_device} + {held} held out needs {need}: lower examples_per_device or the sets"
        )
    rest, heldout = holdout_split(corpus, held / len(corpus), seed=fleet.seed)
    heldout = rng.permutation(heldout)
    validation, test = np.sort(heldout[: data.validation_examples]), np.sort(heldout[data.validation_examples : held])
    pool = rng.permutation(rest)[: d.count * data.examples_per_device]

    order = rng.permutation(d.count)
    n_quality = int(round(data.quality_fraction * d.count))
    quality = set(order[:n_quality].tolist())
    parts: dict[int, np.ndarray] = {}
    for k, dev in enumerate(sorted(quality)):
        parts[dev] = pool[k * data.examples_per_device : (k + 1) * data.examples_per_device]
    left = pool[n_quality * data.examples_per_device :]
    others = [i for i in range(d.count) if i not in quality]
    if others:
        try:
            split = dirichlet_split(corpus.labels[left], len(others), data.dirichlet_alpha,
                                    seed=fleet.seed + 11, min_per_client=2)
        except DemoDataError as exc:
            raise FleetError(str(exc)) from None
        for dev, idx in zip(others, split, strict=True):
            parts[dev] = left[idx]

    # Profiles: ranked by their capability rank, handed out by the assignment rule.
    counts = _counts(dict(d.profiles), d.count)
    slots = [p for p in sorted(counts, key=lambda p: (-PROFILE_RANK[p], p)) for _ in range(counts[p])]
    # Own random streams for profiles and noise: the data of a seed is the same whatever the
    # assignment rule, so runs that differ only in it are paired.
    pick, noise = np.random.default_rng([fleet.seed, 8]), np.random.default_rng([fleet.seed, 9])
    if d.assignment == "random":
        who = pick.permutation(d.count).tolist()
    else:  # slots run from the highest rank down: the quality tier is first or last in line
        head = pick.permutation(sorted(quality)).tolist()
        tail = pick.permutation(others).tolist()
        who = head + tail if d.assignment == "aligned" else tail + head
    profile_of = {dev: slots[i] for i, dev in enumerate(who)}

    width = max(3, len(str(d.count - 1)))
    devices = []
    for dev in range(d.count):
        index = np.sort(parts[dev])
        labels = corpus.labels[index].copy()
        flipped = 0
        if dev not in quality and data.label_noise > 0:
            noisy = noise.random(len(labels)) < data.label_noise
            shift = noise.integers(1, n_classes, size=len(labels))
            labels[noisy] = (labels[noisy] + shift[noisy]) % n_classes
            flipped = int(noisy.sum())
        devices.append(VirtualDevice(
            name=f"device-{dev:0{width}d}", profile=profile_of[dev], quality=dev in quality,
            data=_jsonl(corpus, index, labels), num_examples=len(index), noisy_labels=flipped,
        ))
    return Population(tuple(devices), _jsonl(corpus, validation), _jsonl(corpus, test), corpus.label_names)
