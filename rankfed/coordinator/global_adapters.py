"""Global adapters on disk: one per finished round, plus per-rank copies for downloads.

Layout under the blob root:
    global/round-000003/adapter_model.safetensors   the global adapter at the global rank
    global/round-000003/adapter_config.json         peft config: the directory loads with
                                                    PeftModel.from_pretrained
    global/round-000003/rank-08.safetensors         redistributed to rank 8 (derivable, cached)
Round 0 holds the initial adapter every client starts from.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rankfed.aggregation import (
    Adapter,
    Method,
    decode_adapter,
    encode_adapter,
    revive_inert,
)
from rankfed.coordinator.store import BlobStore
from rankfed.coordinator.store.blobs import global_config_relpath, round_dir
from rankfed.protocol.artifact import AdapterCard, peft_config
from rankfed.protocol.manifest import ModelManifest


@dataclass(frozen=True)
class RankFile:
    relpath: str
    size: int
    sha256: str


def _round_dir(round_no: int) -> str:
    return f"global/{round_dir(round_no)}"


class GlobalAdapters:
    def __init__(self, blobs: BlobStore, manifest: ModelManifest, method: Method, *, seed: int = 0) -> None:
        self._blobs = blobs
        self._seed = seed
        self._manifest = manifest
        self._method = method
        self._lock = threading.Lock()
        self._rank_files: dict[tuple[int, int, float, bool], RankFile] = {}

    def relpath(self, round_no: int) -> str:
        return f"{_round_dir(round_no)}/adapter_model.safetensors"

    def save(self, round_no: int, adapter: Adapter) -> str:
        """Write (fsynced) the global adapter of a round and its peft config; return its sha256."""
        data = encode_adapter(adapter, metadata=self._metadata(round_no))
        config = peft_config(adapter, self._card(round_no))
        self._blobs.write_bytes(global_config_relpath(round_no), json.dumps(config, indent=2).encode())
        sha, _ = self._blobs.write_bytes(self.relpath(round_no), data)
        return sha

    def exists(self, round_no: int) -> bool:
        return self._blobs.exists(self.relpath(round_no))

    def load(self, round_no: int) -> Adapter:
        return decode_adapter(self._blobs.read_bytes(self.relpath(round_no)), spec=self._manifest.adapter_spec())

    def sha256(self, round_no: int) -> str:
        return hashlib.sha256(self._blobs.read_bytes(self.relpath(round_no))).hexdigest()

    def rank_file(self, round_no: int, adapter: Adapter, *, rank: int, alpha: float, use_rslora: bool) -> RankFile:
        """The global adapter of `round_no` redistributed to one rank, written once and reused."""
        key = (round_no, rank, alpha, use_rslora)
        with self._lock:
            cached = self._rank_files.get(key)
            if cached is not None:
                return cached
            local = self._method.redistribute(adapter, rank=rank, alpha=alpha, use_rslora=use_rslora)
            # Components the redistribution leaves at A = 0 and B = 0 could never train.
            local = revive_inert(local, seed=self._seed * 1_000_003 + round_no)
            data = encode_adapter(local, metadata=self._metadata(round_no))
            relpath = f"{_round_dir(round_no)}/rank-{rank:02d}-alpha-{alpha:g}{'-rs' if use_rslora else ''}.safetensors"
            sha, size = self._blobs.write_bytes(relpath, data)
            entry = RankFile(relpath=relpath, size=size, sha256=sha)
            self._rank_files[key] = entry
            # Only the current round's files are served: forget older ones.
            for old in [k for k in self._rank_files if k[0] < round_no]:
                del self._rank_files[old]
            return entry

    def open(self, relpath: str) -> BinaryIO:
        return open(self._blobs.path(relpath), "rb")

    def _card(self, round_no: int) -> AdapterCard:
        m = self._manifest
        return AdapterCard(
            task=m.task, target_modules=tuple(m.target_modules), labels=m.labels, num_labels=m.num_labels,
            modules_to_save=tuple(m.modules_to_save), base_model_id=m.model_id, base_model_sha256=m.weights_sha256,
            round=round_no, method=self._method.name,
        )

    def _metadata(self, round_no: int) -> dict[str, str]:
        m = self._manifest
        return {"round": str(round_no), "base_model_id": m.model_id, "base_model_sha256": m.weights_sha256,
                **self._card(round_no).to_metadata()}


def directory_of(blobs: BlobStore, round_no: int) -> Path:
    """The directory that PeftModel.from_pretrained loads for a round's global adapter."""
    return blobs.path(_round_dir(round_no))
