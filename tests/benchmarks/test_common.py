"""benchmarks/common.py: light checks with small sizes (finite positive numbers, JSON round trip)."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _ok(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_read_bandwidth_small():
    assert _ok(common.measure_read_bandwidth(size_bytes=8 << 20, repeats=2))


def test_read_bandwidth_streams():
    from chatterbox_fast import kernels

    if not kernels.load():
        with pytest.raises(RuntimeError, match="CPU kernels"):
            common.measure_read_bandwidth(size_bytes=8 << 20, repeats=1, streams=4)
    else:
        assert _ok(common.measure_read_bandwidth(size_bytes=8 << 20, repeats=2, streams=4))
    with pytest.raises(ValueError):
        common.measure_read_bandwidth(size_bytes=8 << 20, streams=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_gflops_small(dtype):
    assert _ok(common.measure_gemm_gflops(64, 48, 32, dtype=dtype, repeats=2))


def test_bad_sizes():
    with pytest.raises(ValueError):
        common.measure_read_bandwidth(size_bytes=0)
    with pytest.raises(ValueError):
        common.measure_gemm_gflops(0, 1, 1)
    with pytest.raises(ValueError):
        common.timeit(lambda: None, iters=0)


def test_timeit_counts_and_orders():
    calls = []
    t = common.timeit(lambda: (calls.append(1), time.sleep(0.002)), warmup=2, iters=3, sync=False)
    assert len(calls) == 5 and t["iters"] == 3
    assert 2.0 <= t["min_ms"] <= t["median_ms"] < 1000


def test_machine_info_and_json(tmp_path):
    info = common.machine_info()
    assert info["torch_version"] == torch.__version__ and info["torch_threads"] >= 1 and info["cpu_model"]
    path = common.write_json(tmp_path / "sub" / "r.json", {"info": info, "x": 1.5, "path": tmp_path})
    data = json.loads(path.read_text())
    assert data["x"] == 1.5 and data["info"]["cpu_count"] == info["cpu_count"] and data["path"] == str(tmp_path)
