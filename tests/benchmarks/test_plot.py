"""benchmarks/plot.py: stage timings found in inference.py- and compare.py-shaped JSON, and the PNG (skipped
without matplotlib, the `bench` extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "plot.py"
_spec = importlib.util.spec_from_file_location("benchmarks_plot", _PATH)
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)

INFERENCE = {
    "benchmark": "inference", "device": "cpu", "machine": {"cpu_model": "Test CPU", "torch_threads": 2},
    "modes": {
        "eager-fp32": {"status": "ok", "stages": {"t3_prefill_ms": 100.0, "t3_decode_ms": 3000.0, "flow_ms": 2000.0,
                                                   "hift_ms": 500.0}},
        "compiled-fp32": {"status": "ok", "stages": {"t3_prefill_ms": 90.0, "t3_decode_ms": 2500.0,
                                                      "flow_ms": None, "hift_ms": 400.0}},  # flow missing
        "eager-int8": {"status": "not available", "reason": "no quantize= option"},
    },
    "summary": [{"mode": "eager-fp32", "stages": {"t3_decode_ms": 1.0}}],  # a summary is not drawn twice
}

COMPARE = {
    "benchmark": "compare",
    "reference": {"cases": {"medium": [
        {"total_ms": 10.0, "stages": {"t3_prefill_ms": 1, "t3_decode_ms": 5, "flow_ms": 3, "hift_ms": 1}},
        {"total_ms": 30.0, "stages": {"t3_prefill_ms": 1, "t3_decode_ms": 25, "flow_ms": 3, "hift_ms": 1}},
        {"total_ms": 20.0, "stages": {"t3_prefill_ms": 1, "t3_decode_ms": 15, "flow_ms": 3, "hift_ms": 1,
                                      "watermark_ms": 0.5, "other_ms": -0.1, "vad_ms": 2}},
    ]}},
    "ours": {"eager": {"cases": {"medium": [{"stages": {"t3_decode_ms": 4, "conditioning_ms": 7}}]}},
             "bf16": {"error": "CUDA out of memory"}},
}


def test_collect_inference_json():
    bars, missing = plot.collect(INFERENCE)
    assert [b[0] for b in bars] == ["eager-fp32", "compiled-fp32"]
    assert bars[0][1] == {"t3_prefill_ms": 100.0, "t3_decode_ms": 3000.0, "flow_ms": 2000.0, "hift_ms": 500.0}
    assert "flow_ms" not in bars[1][1]
    assert len(missing) == 1 and missing[0].startswith("eager-int8: not available")


def test_collect_compare_json_takes_the_median_run():
    bars, missing = plot.collect(COMPARE, prefix="cmp")
    d = dict(bars)
    assert set(d) == {"cmp / reference / medium", "cmp / ours / eager / medium"}
    ref = d["cmp / reference / medium"]
    assert ref["t3_decode_ms"] == 15 and ref["other_ms"] == 0.0 and ref["vad_ms"] == 2  # median, clamped, extra key
    assert plot.stage_order(bars) == ["conditioning_ms", "t3_prefill_ms", "t3_decode_ms", "flow_ms", "hift_ms",
                                      "watermark_ms", "other_ms", "vad_ms"]
    assert any("bf16" in m and "out of memory" in m for m in missing)


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "inference.json", tmp_path / "compare.json"
    a.write_text(json.dumps(INFERENCE))
    b.write_text(json.dumps(COMPARE))
    out = tmp_path / "stages.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_no_stages(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"modes": {"a": {"status": "error", "error": "boom"}}}))
    assert plot.main([str(p), "--out", str(tmp_path / "x.png")]) == 1
    assert "a: error boom" in capsys.readouterr().out
    with pytest.raises(ValueError):
        plot.plot([], tmp_path / "y.png")
