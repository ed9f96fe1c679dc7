"""Blob directory for uploaded updates and global adapters, written crash-safely.

Layout under the blob root (helpers below build these paths):

    updates/round-000001/<client_id>.safetensors          an accepted client update
    global/round-000001/adapter_model.safetensors         the round's global adapter
    global/round-000001/adapter_config.json               its peft-compatible config
    global/round-000001/rank-08-alpha-16.safetensors      redistributed to one (rank, alpha)

Why this shape: a round's files sit in one directory that can be listed, archived or
deleted as a unit, and zero-padded round numbers sort in round order.

How a blob is written (`BlobWriter`): bytes stream into a temporary file in the final
directory (named `.<name>.<random>.rankfed-partial`) while a SHA-256 is updated per chunk;
nothing is buffered beyond the chunk the caller passes, so memory does not grow with the
blob. `commit()` fsyncs the file, renames it over the final name (atomic within one
directory) and fsyncs the directory, so after `commit()` returns the blob survives kill -9
and power loss, and a reader sees either no file or the whole file. `abort()` (or leaving
the `with` block without committing) deletes the temporary file. A crash mid-upload leaves
only a `*.rankfed-partial` file, which `sweep_temporaries()` removes at start-up: a partial
or rejected upload leaves no trace.

An upload may instead stream into a *staging* file it names (`open_writer(staged=...)`,
see rankfed.coordinator.staging): the same writer, but the file keeps its name while
bytes arrive, `suspend()` fsyncs and closes it without publishing it (the stream broke;
the device may resume), and a later writer reopens it at a length it trusts
(`resume_at`), hashes that prefix again and appends. `commit()` renames it to the final
name like any other. Staging files do not carry the temporary suffix: start-up leaves
them to the staging area's own recovery.

The disk refusing (ENOSPC, EIO, ...) raises `StorageError` saying which blob, how many
bytes, and where to free space; the temporary file is removed first.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import secrets
from pathlib import Path, PurePosixPath
from types import TracebackType

from rankfed.coordinator.errors import NotFoundError, StorageError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".rankfed-partial"
# Start writing back every this many bytes while a blob streams in, so that commit()'s
# fsync has little left to flush: the receipt waited ~36 ms for a 16 MiB update's fsync
# on the benchmark VM, ~6 ms with early writeback.
WRITEBACK_BYTES = 4 * 1024 * 1024
REHASH_BLOCK = 1024 * 1024  # read size when a resumed writer hashes its staged prefix


def _writeback_starter():
    """sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): queue dirty pages for writing
    without waiting (Linux). None elsewhere; durability never depends on it (commit fsyncs)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_start_writeback = _writeback_starter()


def update_relpath(round: int, client_id: str) -> str:
    """Where a client's accepted update for `round` lives."""
    return f"updates/{round_dir(round)}/{_component(client_id, 'client_id')}.safetensors"


def global_config_relpath(round: int) -> str:
    return f"global/{round_dir(round)}/adapter_config.json"


def round_dir(round: int) -> str:
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    return f"round-{round:06d}"


def _component(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{what} {name!r} cannot be used as a file name")
    return name


def _fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(e: OSError, root: Path, relpath: str, doing: str, nbytes: int) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"disk full while {doing} blob {relpath!r} after {nbytes} bytes: "
            f"free disk space under {root} and retry"
        )
    return StorageError(
        f"I/O error while {doing} blob {relpath!r} under {root} after {nbytes} bytes: "
        f"{e.strerror or e} (errno {e.errno})"
    )


class BlobWriter:
    """Streams one blob to a temporary file; `commit()` publishes it atomically.

    Use as a context manager: leaving the block without `commit()` (an exception, a
    rejected upload) aborts and removes the temporary file.
    """

    def __init__(self, store: BlobStore, relpath: str, final: Path, *, staged: Path | None = None,
                 resume_at: int = 0) -> None:
        """`staged`: write into this file (created, or reopened at `resume_at` bytes, the
        rest cut off) instead of a fresh temporary one."""
        self._store = store
        self._relpath = relpath
        self._final = final
        self._temp = staged if staged is not None else final.parent / f".{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        self._hash = hashlib.sha256()
        self._nbytes = 0
        self._unhashed = 0  # a resumed file's prefix, hashed before the first use of the digest
        self._fd: int | None = None
        self._done = False
        try:
            store._makedirs(final.parent)
            if staged is None:
                self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            else:
                store._makedirs(staged.parent)
                self._fd = fd = os.open(self._temp, os.O_RDWR | os.O_CREAT, 0o644)
                if os.fstat(fd).st_size < resume_at:
                    self.abort()
                    raise StorageError(f"staged file of blob {relpath!r} holds fewer than the {resume_at} bytes to resume "
                                       "from; send the upload again from the start")
                os.ftruncate(fd, resume_at)
                os.lseek(fd, resume_at, os.SEEK_SET)
                self._nbytes = self._unhashed = resume_at
        except OSError as e:
            self.abort()
            raise _io_error(e, store.root, relpath, "creating", 0) from e
        self._written_back = self._nbytes  # bytes handed to early writeback (see WRITEBACK_BYTES)

    @property
    def relpath(self) -> str:
        return self._relpath

    @property
    def temp_path(self) -> Path:
        """The staged file, readable before commit (e.g. to validate an upload)."""
        return self._temp

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def sha256_hex(self) -> str:
        """Digest of the bytes written so far (a resumed file's prefix included)."""
        self._hash_prefix()
        return self._hash.hexdigest()

    def _hash_prefix(self) -> None:
        """Hash the bytes a resumed writer found in its staged file (once, before anything
        else enters the digest): hashlib's state cannot be saved, so it is recomputed."""
        if not self._unhashed:
            return
        fd = self._open_fd()
        at = 0
        try:
            while at < self._unhashed:
                block = os.pread(fd, min(REHASH_BLOCK, self._unhashed - at), at)
                if not block:
                    raise OSError(errno.EIO, f"staged file ended at {at} of {self._unhashed} bytes")
                self._hash.update(block)
                at += len(block)
        except OSError as e:
            err = _io_error(e, self._store.root, self._relpath, "reading back", at)
            self.abort()
            raise err from e
        self._unhashed = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hash_prefix()
        fd = self._open_fd()
        view = memoryview(chunk).cast("B")
        try:
            offset = 0
            while offset < len(view):  # os.write may write less than asked
                offset += os.write(fd, view[offset:])
        except OSError as e:
            err = _io_error(e, self._store.root, self._relpath, "writing", self._nbytes + offset)
            self.abort()
            raise err from e
        self._hash.update(view)
        self._nbytes += len(view)
        if _start_writeback is not None and self._nbytes - self._written_back >= WRITEBACK_BYTES:
            _start_writeback(fd, self._written_back, self._nbytes - self._written_back, 2)  # SYNC_FILE_RANGE_WRITE
            self._written_back = self._nbytes

    def sync(self) -> None:
        """fsync the bytes written so far without publishing them, so that a commit() made
        under a lock has (almost) nothing left to flush."""
        fd = self._open_fd()
        try:
            os.fsync(fd)
        except OSError as e:
            err = _io_error(e, self._store.root, self._relpath, "syncing", self._nbytes)
            self.abort()
            raise err from e

    def commit(self) -> Path:
        """fsync, rename over the final name, fsync the directory; returns the final path."""
        fd = self._open_fd()
        try:
            os.fsync(fd)
            self._fd = None
            os.close(fd)
            os.replace(self._temp, self._final)
            self._done = True
            _fsync_dir(self._final.parent)
        except OSError as e:
            err = _io_error(e, self._store.root, self._relpath, "committing", self._nbytes)
            if not self._done:
                self.abort()
            raise err from e
        return self._final

    def suspend(self) -> int:
        """Keep the file for a later resume: fsync and close it without publishing it;
        returns its length (every byte of it is then on disk). A staging writer only."""
        fd = self._open_fd()
        self._fd, self._done = None, True
        try:
            os.fsync(fd)
        except OSError as e:
            err = _io_error(e, self._store.root, self._relpath, "keeping", self._nbytes)
            os.close(fd)
            self._unlink_temp()
            raise err from e
        os.close(fd)
        return self._nbytes

    def abort(self) -> None:
        """Drop the temporary file. Idempotent; a no-op after commit."""
        if self._done:
            return
        self._done = True
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        self._unlink_temp()

    def _unlink_temp(self) -> None:
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove %s; the start-up sweep will", self._temp)

    def _open_fd(self) -> int:
        if self._done or self._fd is None:
            raise ValueError(f"blob writer for {self._relpath!r} is already committed or aborted")
        return self._fd

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit/abort must not leak its descriptor.
        fd = getattr(self, "_fd", None)
        if fd is not None and not getattr(self, "_done", True):
            self.abort()


class BlobStore:
    """Files under one root, addressed by relative POSIX paths that cannot escape it."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).absolute()
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create blob directory {self._root}: {e}") from e
        self._resolved_root = self._root.resolve()

    @property
    def root(self) -> Path:
        return self._root

    def path(self, relpath: str) -> Path:
        """Absolute path of `relpath`. ValueError if it is absolute, has '..' or escapes."""
        rel = PurePosixPath(relpath)
        parts = rel.parts
        if not relpath or rel.is_absolute() or "\\" in relpath or "\x00" in relpath:
            raise ValueError(f"blob path {relpath!r} must be a relative POSIX path")
        if any(p in ("..", ".") for p in relpath.split("/")) or not parts:
            raise ValueError(f"blob path {relpath!r} may not contain '.' or '..' components")
        if parts[-1].endswith(TEMP_SUFFIX):
            raise ValueError(f"blob path {relpath!r} uses the reserved suffix {TEMP_SUFFIX}")
        full = self._root.joinpath(*parts)
        if not full.resolve().is_relative_to(self._resolved_root):  # a symlink inside root
            raise ValueError(f"blob path {relpath!r} resolves outside {self._root}")
        return full

    def open_writer(self, relpath: str, *, staged: str | None = None, resume_at: int = 0) -> BlobWriter:
        """Start streaming a blob; an existing blob at `relpath` is replaced on commit.

        `staged`: the relpath of a staging file to stream into (kept by `suspend()`),
        reopened at `resume_at` bytes when resuming (see BlobWriter)."""
        return BlobWriter(self, relpath, self.path(relpath), staged=None if staged is None else self.path(staged),
                          resume_at=resume_at)

    def write_bytes(self, relpath: str, data: bytes) -> tuple[str, int]:
        """Write a whole (small) blob atomically and durably; returns (sha256 hex, size)."""
        with self.open_writer(relpath) as w:
            w.write(data)
            w.commit()
            return w.sha256_hex(), w.nbytes

    def read_bytes(self, relpath: str) -> bytes:
        with self.open_reader(relpath) as fh:
            try:
                return fh.read()
            except OSError as e:
                raise _io_error(e, self._root, relpath, "reading", 0) from e

    def open_reader(self, relpath: str) -> io.BufferedReader:
        """The blob opened for reading (a file object: map it, hash it, read it); a missing
        blob is NotFoundError, another failure StorageError."""
        try:
            return open(self.path(relpath), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {relpath!r} does not exist under {self._root}") from None
        except OSError as e:
            raise _io_error(e, self._root, relpath, "reading", 0) from e

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def delete(self, relpath: str) -> bool:
        """Remove a blob durably; returns False if it was not there (deleting is idempotent)."""
        full = self.path(relpath)
        try:
            full.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _io_error(e, self._root, relpath, "deleting", 0) from e
        try:
            _fsync_dir(full.parent)
        except OSError as e:
            raise _io_error(e, self._root, relpath, "deleting", 0) from e
        return True

    def list_blobs(self, prefix: str = "") -> list[str]:
        """Committed blobs under the directory `prefix` ('' for all), sorted relpaths.

        For recovery: e.g. update files with no receipt (a crash between commit and the
        receipt) can be found and deleted.
        """
        base = self.path(prefix) if prefix else self._root
        found: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if not name.endswith(TEMP_SUFFIX):
                    found.append(Path(dirpath, name).relative_to(self._root).as_posix())
        return sorted(found)

    def drop_cached(self, prefix: str) -> int:
        """Advise the kernel to drop the page cache of the committed blobs under `prefix`
        (their bytes stay on disk; a later read fetches them again); returns how many.

        Why: every round writes blobs (updates, a global adapter, its rank files) that are
        read back once or not at all after the round. Kept cached, each round's writes take
        fresh pages; dropped, the next round's writes reuse these. On the benchmark VM fresh
        pages cost ten times more to write into once ~1 GiB had been cached (0.25 -> 2.5
        ms of system CPU per MiB, doubling an upload's coordinator CPU). Only pages that
        are synced and unmapped are dropped; a blob still mapped keeps its pages. Advice
        only: no error is raised, and it is a no-op where posix_fadvise does not exist."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return 0
        dropped = 0
        for relpath in self.list_blobs(prefix):
            try:
                fd = os.open(self.path(relpath), os.O_RDONLY)
            except OSError:
                continue  # removed meanwhile (retention) or unreadable: nothing to drop
            try:
                advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += 1
            except OSError as e:
                log.debug("could not drop the cache of %s: %s", relpath, e)
            finally:
                os.close(fd)
        return dropped

    def sweep_temporaries(self) -> int:
        """Delete leftover `*.rankfed-partial` files; returns how many.

        Call at start-up, before serving: it would also delete the staging file of a
        writer that is open at the time.
        """
        removed = 0
        for dirpath, _dirs, files in os.walk(self._root):
            for name in files:
                if name.endswith(TEMP_SUFFIX):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        raise StorageError(
                            f"cannot remove partial blob {os.path.join(dirpath, name)}: {e}"
                        ) from e
        return removed

    def _makedirs(self, directory: Path) -> None:
        """mkdir -p, fsyncing each parent whose entries changed, so new dirs survive power loss."""
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(d.parent)
