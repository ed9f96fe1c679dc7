"""Capability probe: what this device is and how fast it computes.

Measures, in well under a second: device class (cuda when torch sees a GPU, mps, cpu;
`mobile` when declared or detected), total and free memory, cores, and dense fp32 matmul
throughput. Bandwidth cannot be measured without a coordinator: it is measured on the real
link by the client's transfers (`EdgeTransport.upload_bytes_per_second`) and reported at the
next Join; `probe()` takes the last measurement as an argument.

torch is optional here: without it the matmul runs in numpy and the class is cpu/mobile.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np

from rankfed.protocol import Capability, DeviceClass


def _memory_bytes() -> tuple[int, int]:
    """(total, available) system memory in bytes; (0, 0) when unknown."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        pass
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, ValueError):
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, os.sysconf("SC_AVPHYS_PAGES") * size
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _looks_mobile() -> bool:
    return "ANDROID_ROOT" in os.environ or platform.system() in ("Android", "iOS")


GFLOPS_ENV = "RANKFED_GFLOPS"  # operator override of the measured speed (--gflops sets it)


def measure_gflops(n: int = 256, budget_s: float = 0.5, device: str = "cpu", repetitions: int = 7) -> float:
    """fp32 matmul throughput in GFLOP/s (2·n³ flops per matmul): the median of
    ``repetitions`` timed runs after a warm-up.

    Why this shape: the first matmuls pay for thread-pool start-up, page faults and CPU
    frequency ramp-up, and a single timed matmul on a shared machine can land on a
    descheduled slice (one run measured 2.5 GFLOP/s where the next gave 166). So: warm up
    for a tenth of the budget, then time `repetitions` runs of k matmuls each (k chosen so
    a run lasts about budget / repetitions), and report the median run."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    flops = 2.0 * n**3
    try:
        import torch
    except ImportError:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        return flops / _median_seconds(lambda: a @ b, lambda: None, budget_s, repetitions) / 1e9
    ta = torch.randn(n, n, device=device)
    tb = torch.randn(n, n, device=device)
    sync: Callable[[], object] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        return flops / _median_seconds(lambda: ta @ tb, sync, budget_s, repetitions) / 1e9


def _median_seconds(op: Callable[[], object], sync: Callable[[], object], budget_s: float, repetitions: int) -> float:
    """Median seconds per `op` over `repetitions` timed runs, after a warm-up."""
    warm_until = time.perf_counter() + budget_s / 10
    calls = 0
    start = time.perf_counter()
    while calls < 3 or time.perf_counter() < warm_until:
        op()
        calls += 1
    sync()
    per_call = max((time.perf_counter() - start) / calls, 1e-9)
    k = max(1, int(budget_s * 0.9 / repetitions / per_call))
    runs = []
    for _ in range(repetitions):
        t = time.perf_counter()
        for _ in range(k):
            op()
        sync()
        runs.append((time.perf_counter() - t) / k)
    return float(np.median(runs))


def probe(
    *,
    declared_class: DeviceClass | None = None,
    declared_gflops: float | None = None,
    upload_bytes_per_second: float = 0.0,
    download_bytes_per_second: float = 0.0,
    budget_s: float = 0.5,
) -> Capability:
    """Measure this device. ``declared_class`` overrides the detected device class (what is
    reported at Join; training still runs where torch can); ``declared_gflops`` (default:
    $RANKFED_GFLOPS when set) replaces the measured speed, for operators who know better
    or want a fixed rank."""
    if declared_gflops is None and os.environ.get(GFLOPS_ENV):
        declared_gflops = parse_gflops(os.environ[GFLOPS_ENV], GFLOPS_ENV)
    total, free = _memory_bytes()
    device_class = DeviceClass.MOBILE if _looks_mobile() else DeviceClass.CPU
    accel_name, accel_mem, device = "", 0, "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device_class, device = DeviceClass.CUDA, "cuda"
            accel_name, accel_mem = props.name, int(props.total_memory)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device_class, accel_name = DeviceClass.MPS, "mps"
    except ImportError:
        pass
    cap = Capability(
        device_class=declared_class or device_class,
        memory_total_bytes=total,
        memory_free_bytes=free,
        cpu_cores=_cpu_cores(),
        compute_gflops=round(declared_gflops if declared_gflops is not None
                             else measure_gflops(budget_s=budget_s, device=device), 2),
        upload_bytes_per_second=upload_bytes_per_second,
        download_bytes_per_second=download_bytes_per_second,
        accelerator_name=accel_name,
        accelerator_memory_bytes=accel_mem,
        platform=platform.platform(),
    )
    return cap


def parse_gflops(text: str, what: str = "--gflops") -> float:
    """A declared speed: a finite number > 0, or ValueError naming `what`."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} = {text!r}: expected a number of GFLOP/s, e.g. 50") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{what} = {text!r}: must be a finite number > 0")
    return value


def with_bandwidth(cap: Capability, upload_bps: float, download_bps: float) -> Capability:
    """``cap`` with newly measured link speeds (0 keeps the old value)."""
    return replace(
        cap,
        upload_bytes_per_second=upload_bps or cap.upload_bytes_per_second,
        download_bytes_per_second=download_bps or cap.download_bytes_per_second,
    )


def capability_dict(cap: Capability) -> dict[str, object]:
    d = asdict(cap)
    d["device_class"] = str(cap.device_class)
    return d
