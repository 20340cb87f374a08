"""Shared helpers for the benchmark scripts (a plain module, not part of the package).

Machine ceilings are measured with torch itself so that a benchmark can report how close a stage gets to them:
- `measure_read_bandwidth`: memory read bandwidth, from the best time of `x.sum()` over a large fp32 tensor (the
  sum reads every byte once and writes one scalar, so bytes / time is the read bandwidth). It runs on torch's
  current intra-op thread count, the same threads the model uses. Best of several runs: the least disturbed one.
  With `streams` > 1 (CPU, our kernels): each thread reads its share as that many interleaved streams, as our decode
  kernels do; faster than one stream on the 2-core VM, so the stricter floor.
- `measure_gemm_gflops`: dense matmul throughput, 2*m*n*k flops / best time.
- `timeit`: min and median wall time of a callable after warm-up, with a device sync around each call on CUDA.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _cuda_sync_default(device: torch.device | str | None = None) -> bool:
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync(on: bool) -> None:
    if on:
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], warmup: int = 2, iters: int = 10, sync: bool | None = None) -> dict[str, float]:
    """Time `fn()`: {"min_ms", "median_ms", "iters"} over `iters` calls after `warmup` untimed calls.

    sync: call torch.cuda.synchronize() before and after each timed call (default: when CUDA is initialised), so
    asynchronous GPU work is inside the measured interval.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    sync = _cuda_sync_default() if sync is None else sync
    for _ in range(warmup):
        fn()
    _sync(sync)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(sync)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"min_ms": min(times), "median_ms": statistics.median(times), "iters": iters}


class StageTimer:
    """Accumulated wall time per stage name (ms) of wrapped callables; with cuda=True each call is bracketed by
    torch.cuda.synchronize(), so asynchronous GPU work lands in its own stage."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.ms: dict[str, float] = {}

    def sync(self) -> None:
        _sync(self.cuda)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
            return out
        return timed


def measure_read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5, device: str = "cpu",
                           streams: int = 1) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): size_bytes / best time of summing an fp32 tensor of that size.

    streams=1: `x.sum()` (ATen: one sequential stream per thread). streams > 1 (CPU, our kernels loaded):
    `chatterbox_fast::read_probe`, each thread reading its share as that many interleaved streams, which is how the
    decode kernels read their weights; on the 2-core VM 4 streams read ~1.4x faster than one (BENCHMARKS.md)."""
    numel = size_bytes // 4
    if numel < 1 or repeats < 1 or streams < 1:
        raise ValueError(f"need size_bytes >= 4, repeats >= 1 and streams >= 1, got {size_bytes}, {repeats}, "
                         f"{streams}")
    x = torch.ones(numel, dtype=torch.float32, device=device)
    if streams == 1:
        fn = x.sum
    else:
        from chatterbox_fast import kernels

        if device != "cpu" or not kernels.load():
            raise RuntimeError("streams > 1 needs the CPU kernels (chatterbox_fast::read_probe)")
        fn = lambda: torch.ops.chatterbox_fast.read_probe(x, streams)  # noqa: E731
    t = timeit(fn, warmup=1, iters=repeats, sync=_cuda_sync_default(device))
    return numel * 4 / (t["min_ms"] * 1e-3) / 1e9


def measure_gemm_gflops(
    m: int = 2048, n: int = 2048, k: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5,
    device: str = "cpu",
) -> float:
    """Matmul throughput in GFLOP/s: 2*m*n*k / best time of an (m, k) @ (k, n) product."""
    if min(m, n, k) < 1 or repeats < 1:
        raise ValueError(f"need positive sizes and repeats, got m={m} n={n} k={k} repeats={repeats}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    t = timeit(lambda: torch.mm(a, b, out=out), warmup=1, iters=repeats, sync=_cuda_sync_default(device))
    return 2.0 * m * n * k / (t["min_ms"] * 1e-3) / 1e9


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_gb() -> float | None:
    """Current resident set size of this process in GB (Linux /proc), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpu_flags() -> list[str] | None:
    """The flags of /proc/cpuinfo that decide which of our kernels run and how fast bf16 / int8 GEMMs are (our
    machines differ: some have AMX, most not); None where /proc/cpuinfo is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def machine_info() -> dict[str, Any]:
    """What a result was measured on: CPU, core counts, torch version and threads, GPU if CUDA is available."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_flags": _cpu_flags(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
        }
    return info


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON (parents created; written to a temp name then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
