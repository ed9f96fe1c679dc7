"""Global adapters on disk: one per finished round, plus per-rank copies for downloads.

Layout under the blob root:
    global/round-000003/adapter_model.safetensors   the global adapter at the global rank
    global/round-000003/adapter_config.json         peft config: the directory loads with
                                                    PeftModel.from_pretrained
    global/round-000003/rank-08.safetensors         redistributed to rank 8 (derivable, cached)
Round 0 holds the initial adapter every client starts from.

Memory: a global adapter is written tensor by tensor (`write_adapter` into a BlobWriter),
never as one bytes object, and the one the coordinator keeps (`load`) is a read-only
mapping of its file: its float32 tensors are views of the page cache, whose pages leave
the process's resident set once read (`release_pages`). Round close then holds the
accumulator and the new adapter, not also the previous one and an encoding of the new.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rankfed.aggregation import (
    Adapter,
    Method,
    decode_adapter,
    revive_inert,
    write_adapter,
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
        self._maps: dict[int, mmap.mmap] = {}  # the mapped file of each loaded adapter (see load)

    def relpath(self, round_no: int) -> str:
        return f"{_round_dir(round_no)}/adapter_model.safetensors"

    def save(self, round_no: int, adapter: Adapter) -> str:
        """Write (fsynced) the global adapter of a round and its peft config; return its sha256."""
        config = peft_config(adapter, self._card(round_no))
        self._blobs.write_bytes(global_config_relpath(round_no), json.dumps(config, indent=2).encode())
        sha, _ = self._write(self.relpath(round_no), adapter, round_no)
        return sha

    def exists(self, round_no: int) -> bool:
        return self._blobs.exists(self.relpath(round_no))

    def load(self, round_no: int) -> Adapter:
        """The global adapter of a round, decoded and checked against the manifest from a
        read-only mapping of its file; the pages the check read are released at once."""
        with self._blobs.open_reader(self.relpath(round_no)) as fh:
            view = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) if os.fstat(fh.fileno()).st_size else b""
        adapter = decode_adapter(memoryview(view), spec=self._manifest.adapter_spec())
        if isinstance(view, mmap.mmap):
            with self._lock:
                self._maps[round_no] = view
                for old in [r for r in self._maps if r < round_no]:
                    del self._maps[old]  # unmapped once the last view of it goes
        self.release_pages(round_no)
        return adapter

    def release_pages(self, round_no: int) -> None:
        """Take a loaded adapter's pages out of the resident set (they stay in the page
        cache; the next read maps them again). Nothing changes for its readers."""
        view = self._maps.get(round_no)
        if view is not None and hasattr(view, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            view.madvise(mmap.MADV_DONTNEED)

    def drop_cached(self, round_no: int) -> None:
        """Drop the page cache of a round's global adapter and its rank files (kept on disk)."""
        self._blobs.drop_cached(_round_dir(round_no))

    def sha256(self, round_no: int) -> str:
        with self._blobs.open_reader(self.relpath(round_no)) as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

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
            relpath = f"{_round_dir(round_no)}/rank-{rank:02d}-alpha-{alpha:g}{'-rs' if use_rslora else ''}.safetensors"
            sha, size = self._write(relpath, local, round_no)
            del local
            entry = RankFile(relpath=relpath, size=size, sha256=sha)
            self._rank_files[key] = entry
            # Only the current round's files are served: forget older ones.
            for old in [k for k in self._rank_files if k[0] < round_no]:
                del self._rank_files[old]
        self.release_pages(round_no)
        return entry

    def _write(self, relpath: str, adapter: Adapter, round_no: int) -> tuple[str, int]:
        """Stream an adapter into a blob, tensor by tensor; (sha256 hex, size)."""
        with self._blobs.open_writer(relpath) as writer:
            write_adapter(adapter, writer.write, metadata=self._metadata(round_no))
            writer.commit()
            return writer.sha256_hex(), writer.nbytes

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
