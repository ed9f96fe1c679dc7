"""BlobStore: atomic, fsynced, bounded-memory writes; sweeping; disk-full; path safety."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from rankfed.coordinator.errors import NotFoundError, StorageError
from rankfed.coordinator.store import (
    BlobStore,
    global_config_relpath,
    update_relpath,
)
from rankfed.coordinator.store.blobs import TEMP_SUFFIX

REL = "updates/round-000001/c1.safetensors"


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def temporaries(b: BlobStore) -> list[Path]:
    return list(b.root.rglob(f"*{TEMP_SUFFIX}"))


def test_layout_helpers() -> None:
    assert update_relpath(1, "c1") == REL
    assert global_config_relpath(3) == "global/round-000003/adapter_config.json"
    with pytest.raises(ValueError):
        update_relpath(1, "../evil")
    with pytest.raises(ValueError):
        global_config_relpath(-1)


def test_writer_is_atomic_and_hashes(blobs: BlobStore) -> None:
    parts: list[bytes | bytearray | memoryview] = [
        b"abc",
        bytearray(b"def" * 1000),
        memoryview(b"\x00\xff" * 4096),
    ]
    with blobs.open_writer(REL) as w:
        for p in parts:
            w.write(p)
            assert not blobs.exists(REL)  # nothing visible before commit
        assert w.temp_path.is_file() and w.temp_path.parent == blobs.path(REL).parent
        data = b"".join(bytes(p) for p in parts)
        assert w.nbytes == len(data)
        assert w.sha256_hex() == hashlib.sha256(data).hexdigest()
        final = w.commit()
    assert final == blobs.path(REL) and final.read_bytes() == data
    assert blobs.read_bytes(REL) == data
    assert temporaries(blobs) == []
    with pytest.raises(ValueError, match="already committed"):
        w.write(b"more")


def test_abort_and_exception_remove_temporary(blobs: BlobStore) -> None:
    w = blobs.open_writer(REL)
    w.write(b"x" * 100)
    w.abort()
    w.abort()  # idempotent
    assert temporaries(blobs) == [] and not blobs.exists(REL)

    with pytest.raises(RuntimeError):
        with blobs.open_writer(REL) as w:
            w.write(b"partial")
            raise RuntimeError("client went away")
    assert temporaries(blobs) == [] and not blobs.exists(REL)

    with blobs.open_writer(REL) as w:  # leaving without commit = rejected upload
        w.write(b"digest mismatch")
    assert temporaries(blobs) == [] and not blobs.exists(REL)


def test_commit_replaces_existing_blob(blobs: BlobStore) -> None:
    blobs.write_bytes(REL, b"old")
    with blobs.open_writer(REL) as w:
        w.write(b"new")
        assert blobs.read_bytes(REL) == b"old"
        w.commit()
    assert blobs.read_bytes(REL) == b"new"


def test_commit_fsyncs_file_and_directory(
    blobs: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with blobs.open_writer(REL) as w:
        w.write(b"data")
        temp = str(w.temp_path)
        synced.clear()  # directories created by open_writer were fsynced too; look at commit
        w.commit()
    assert synced == [temp, str(blobs.path(REL).parent)]


def test_write_bytes_read_exists_delete(blobs: BlobStore) -> None:
    cfg = global_config_relpath(1)
    digest, size = blobs.write_bytes(cfg, b'{"r": 8}')
    assert (digest, size) == (hashlib.sha256(b'{"r": 8}').hexdigest(), 8)
    assert blobs.exists(cfg) and blobs.read_bytes(cfg) == b'{"r": 8}'
    assert blobs.list_blobs() == [cfg]
    assert blobs.list_blobs("global") == [cfg] and blobs.list_blobs("updates") == []
    assert blobs.delete(cfg) is True
    assert blobs.delete(cfg) is False
    assert not blobs.exists(cfg)
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        blobs.read_bytes(cfg)


def test_sweep_removes_only_temporaries(blobs: BlobStore) -> None:
    blobs.write_bytes(REL, b"kept")
    w = blobs.open_writer(update_relpath(1, "c2"))
    w.write(b"crash mid-upload")
    # simulate the crash: the process dies, the descriptor is gone, the file stays
    os.close(w._fd)  # type: ignore[arg-type]
    w._fd, w._done = None, True
    (blobs.root / "global").mkdir()
    (blobs.root / "global" / f".rank-08.safetensors.1234{TEMP_SUFFIX}").write_bytes(b"x")
    assert len(temporaries(blobs)) == 2
    assert blobs.sweep_temporaries() == 2
    assert temporaries(blobs) == []
    assert blobs.read_bytes(REL) == b"kept"
    assert blobs.list_blobs() == [REL]
    assert blobs.sweep_temporaries() == 0


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_disk_errors_raise_storage_error_and_clean_up(
    blobs: BlobStore, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: bytes) -> int:  # fault injection: the 3rd chunk fails
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    w = blobs.open_writer(REL)
    monkeypatch.setattr(os, "write", failing_write)
    w.write(b"a" * 1000)
    w.write(b"b" * 1000)
    with pytest.raises(StorageError) as e:
        w.write(b"c" * 1000)
    msg = str(e.value)
    assert REL in msg and "2000 bytes" in msg
    if err == errno.ENOSPC:
        assert f"free disk space under {blobs.root}" in msg
    assert temporaries(blobs) == [] and not blobs.exists(REL)
    with pytest.raises(ValueError):
        w.commit()


def test_enospc_on_fsync_at_commit(blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with blobs.open_writer(REL) as w:
        w.write(b"x" * 10)
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(StorageError, match="free disk space"):
            w.commit()
    assert temporaries(blobs) == [] and not blobs.exists(REL)


def test_enospc_in_write_bytes(blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match=r"disk full.*0 bytes.*free disk space"):
        blobs.write_bytes(REL, b"payload")
    assert temporaries(blobs) == [] and not blobs.exists(REL)


def test_short_writes_are_completed(blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    data = bytes(range(256)) * 10
    assert blobs.write_bytes(REL, data) == (hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.undo()
    assert blobs.read_bytes(REL) == data


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a\\b",
        "a//b/.",
        "x" + TEMP_SUFFIX,
        "a\x00b",
    ],
)
def test_paths_that_escape_are_refused(blobs: BlobStore, bad: str) -> None:
    with pytest.raises(ValueError):
        blobs.path(bad)
    with pytest.raises(ValueError):
        blobs.open_writer(bad)


def test_symlink_escape_is_refused(blobs: BlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (blobs.root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        blobs.write_bytes("link/x", b"y")
    assert list(outside.iterdir()) == []


def test_memory_stays_bounded(blobs: BlobStore) -> None:
    chunk = os.urandom(1 << 20)
    expected = hashlib.sha256()
    gc.collect()
    tracemalloc.start()
    try:
        with blobs.open_writer("global/round-000001/rank-64.safetensors") as w:
            for _ in range(64):  # 64 MiB in 1 MiB chunks
                w.write(chunk)
            w.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for _ in range(64):
        expected.update(chunk)
    assert w.nbytes == 64 << 20 and w.sha256_hex() == expected.hexdigest()
    assert peak < 256 << 10, f"writer peaked at {peak} bytes for a 64 MiB blob"


def _run_and_sigkill(code: str) -> None:
    """Run `code` in a child that SIGKILLs itself at the end (no cleanup of any kind)."""
    src = f"import os, signal, sys\nsys.path[:0] = {sys.path!r}\n{code}\n"
    src += "os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_kill_9_mid_upload_leaves_only_a_sweepable_temporary(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    _run_and_sigkill(
        "from rankfed.coordinator.store import BlobStore\n"
        f"w = BlobStore({str(root)!r}).open_writer({REL!r})\n"
        "w.write(b'half an update' * 1000)\n"
    )
    blobs = BlobStore(root)
    assert not blobs.exists(REL) and blobs.list_blobs() == []
    assert blobs.sweep_temporaries() == 1
    assert temporaries(blobs) == []


def test_kill_9_right_after_commit_keeps_the_blob(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    data = os.urandom(3 << 20)
    (tmp_path / "payload").write_bytes(data)
    _run_and_sigkill(
        "from pathlib import Path\n"
        "from rankfed.coordinator.store import BlobStore\n"
        f"data = Path({str(tmp_path / 'payload')!r}).read_bytes()\n"
        f"with BlobStore({str(root)!r}).open_writer({REL!r}) as w:\n"
        "    for i in range(0, len(data), 1 << 20):\n"
        "        w.write(data[i : i + (1 << 20)])\n"
        "    w.commit()\n"
    )
    blobs = BlobStore(root)
    assert blobs.read_bytes(REL) == data
    assert blobs.sweep_temporaries() == 0


def _resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore over a mapping of it)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        vec = ctypes.create_string_buffer(pages)
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


def _on_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, kind = line.split()[:3]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/mounts").exists(),
                    reason="page-cache advice and mincore are Linux's")
def test_drop_cached_drops_the_page_cache_of_the_blobs_under_a_prefix_only(blobs: BlobStore) -> None:
    if _on_tmpfs(blobs.root.parent):
        pytest.skip("tmpfs keeps its pages in memory: nothing to drop")
    data = os.urandom(1 << 20)
    cold = [update_relpath(1, "c1"), update_relpath(1, "c2")]
    warm = update_relpath(2, "c1")
    for relpath in (*cold, warm):
        blobs.write_bytes(relpath, data)  # fsynced: clean pages, which the kernel may drop
        assert blobs.read_bytes(relpath) == data
    partial = blobs.open_writer(update_relpath(1, "c3"))
    partial.write(b"still streaming")
    assert blobs.drop_cached("updates/round-000001") == 2  # the committed blobs, not the partial one
    assert [_resident_pages(blobs.path(r)) for r in cold] == [0, 0]
    assert _resident_pages(blobs.path(warm)) > 0
    assert all(blobs.read_bytes(r) == data for r in cold)  # on disk all along
    assert blobs.drop_cached("updates/round-000009") == 0  # nothing there: nothing to do
    partial.abort()
