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


def measure_gflops(n: int = 256, budget_s: float = 0.25, device: str = "cpu") -> float:
    """Best-of fp32 matmul throughput in GFLOP/s within ``budget_s`` (2·n³ flops per matmul)."""
    flops = 2.0 * n**3
    best = float("inf")
    try:
        import torch
    except ImportError:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        a @ b  # warm-up
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return flops / best / 1e9
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        a @ b
        sync()
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def probe(
    *,
    declared_class: DeviceClass | None = None,
    upload_bytes_per_second: float = 0.0,
    download_bytes_per_second: float = 0.0,
    budget_s: float = 0.25,
) -> Capability:
    """Measure this device. ``declared_class`` overrides the detected device class (what is
    reported at Join; training still runs where torch can)."""
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
        compute_gflops=round(measure_gflops(budget_s=budget_s, device=device), 2),
        upload_bytes_per_second=upload_bytes_per_second,
        download_bytes_per_second=download_bytes_per_second,
        accelerator_name=accel_name,
        accelerator_memory_bytes=accel_mem,
        platform=platform.platform(),
    )
    return cap


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
