"""Time per stage, as a stacked bar per implementation / mode, from benchmark JSON files -> PNG.

    .venv/bin/python benchmarks/plot.py benchmarks/results/inference-cpu-*.json [compare-cpu-*.json ...] \
        --out benchmarks/results/stages.png

Reads any JSON written by benchmarks/inference.py or benchmarks/compare.py: every object holding a "stages" dict
of per-stage milliseconds for one request ({"conditioning_ms", "t3_prefill_ms", "t3_decode_ms", "flow_ms",
"hift_ms", "watermark_ms", "other_ms", ...}; missing keys count as absent, unknown *_ms keys are drawn after the
known ones) becomes one bar, labelled by where it sits in the file (container keys such as "modes" / "cases" /
"runs" dropped; the file's name in front when several files are given). A list of runs of one case gives one bar:
the run with the median total. Objects without stages (failed or unavailable modes) are listed on stdout, not drawn.
The title says RANDOM WEIGHTS: the checkpoints these benchmarks use make noise, not speech.

matplotlib is needed for the PNG only (`pip install 'chatterbox-fast[bench]'`); `collect` works without it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

STAGES = ("conditioning_ms", "t3_prefill_ms", "t3_decode_ms", "flow_ms", "hift_ms", "watermark_ms", "other_ms")
LABELS = {"conditioning_ms": "conditioning", "t3_prefill_ms": "T3 prefill", "t3_decode_ms": "T3 decode",
          "flow_ms": "S3Gen flow", "hift_ms": "HiFT vocoder", "watermark_ms": "watermark", "other_ms": "other"}
COLORS = {"conditioning_ms": "#8c564b", "t3_prefill_ms": "#aec7e8", "t3_decode_ms": "#1f77b4",
          "flow_ms": "#ff7f0e", "hift_ms": "#2ca02c", "watermark_ms": "#9467bd", "other_ms": "#c7c7c7"}
EXTRA_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#d62728")
CONTAINERS = {"modes", "cases", "runs", "impls", "implementations", "results"}
NOTE = "RANDOM WEIGHTS (noise, not speech)"


def _ms(v: Any) -> float | None:
    """A drawable stage time: a finite number; small negatives (an 'other' remainder) clamp to 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return max(float(v), 0.0)


def _clean(stages: dict) -> dict[str, float]:
    return {k: v for k, v in ((k, _ms(x)) for k, x in stages.items() if k.endswith("_ms")) if v is not None}


def collect(data: Any, prefix: str = "") -> tuple[list[tuple[str, dict[str, float]]], list[str]]:
    """-> ([(label, {stage: ms})], [labels of objects that have a status/error but no stages])."""
    bars: list[tuple[str, dict[str, float]]] = []
    missing: list[str] = []

    def label(path: list[str]) -> str:
        parts = [p for p in path if p not in CONTAINERS]
        return " / ".join([prefix] * bool(prefix) + parts) or "(top level)"

    def walk(obj: Any, path: list[str]) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("stages"), dict):
                stages = _clean(obj["stages"])
                if stages:
                    bars.append((label(path), stages))
                    return
            if ("error" in obj or obj.get("status") not in (None, "ok", "running")) and path:
                missing.append(f"{label(path)}: {obj.get('status') or 'error'} {str(obj.get('error') or obj.get('reason') or '')[:120]}")
                return
            for k, v in obj.items():
                if k in ("summary", "stages"):  # summaries repeat the runs' numbers
                    continue
                walk(v, path + [str(k)])
        elif isinstance(obj, list):
            runs = [x for x in obj if isinstance(x, dict) and isinstance(x.get("stages"), dict) and _clean(x["stages"])]
            if runs:  # several runs of one case: the one with the median total
                runs.sort(key=lambda r: sum(_clean(r["stages"]).values()))
                bars.append((label(path), _clean(runs[(len(runs) - 1) // 2]["stages"])))
                return
            for i, x in enumerate(obj):
                walk(x, path + [str(i)] if len(obj) > 1 else path)

    walk(data, [])
    return bars, missing


def stage_order(bars: list[tuple[str, dict[str, float]]]) -> list[str]:
    extra: list[str] = []
    for _, s in bars:
        extra += [k for k in s if k not in STAGES and k not in extra]
    present = {k for _, s in bars for k in s}
    return [k for k in STAGES if k in present] + extra


def describe(data: dict) -> str:
    m = data.get("machine") or {}
    gpu = m.get("gpu")
    where = gpu.get("name") if isinstance(gpu, dict) else None
    dev = data.get("device") or (data.get("args") or {}).get("device")
    if not where or dev == "cpu":
        where = f"{m.get('cpu_model', '?')}, {m.get('torch_threads', '?')} threads"
    return f"{dev or '?'}: {where}, torch {m.get('torch_version', '?')}"


def plot(bars: list[tuple[str, dict[str, float]]], out: Path, title: str = "", unit: str = "auto") -> Path:
    """Horizontal stacked bars (one per label, stages in pipeline order, total at the end) -> PNG at `out`."""
    if not bars:
        raise ValueError("no stage timings to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("benchmarks/plot.py needs matplotlib for the PNG: pip install 'chatterbox-fast[bench]' "
                          f"(or pip install matplotlib) ({e})") from e
    if not bars:
        raise ValueError("no stage timings to plot")
    order = stage_order(bars)
    totals = [sum(s.values()) for _, s in bars]
    if unit == "auto":
        unit = "s" if max(totals) >= 5000 else "ms"
    scale = 1e-3 if unit == "s" else 1.0
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.55 * len(bars)))
    y = list(range(len(bars)))[::-1]  # first bar on top
    left = [0.0] * len(bars)
    extra = iter(EXTRA_COLORS * 4)
    for k in order:
        w = [s.get(k, 0.0) * scale for _, s in bars]
        ax.barh(y, w, left=left, height=0.6, label=LABELS.get(k, k.removesuffix("_ms")),
                color=COLORS.get(k) or next(extra), edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, w)]
    for yi, tot in zip(y, totals):
        ax.text(tot * scale, yi, f" {tot * scale:.3g} {unit}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([lab for lab, _ in bars], fontsize=8)
    ax.set_xlabel(f"time per request ({unit})")
    ax.set_xlim(0, max(totals) * scale * 1.15)
    if "RANDOM WEIGHTS" not in title.upper():
        title = f"{title}\n{NOTE}" if title else f"Time per stage. {NOTE}"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.3 / max(len(bars), 1)), ncol=min(len(order), 7),
              fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="result files of inference.py / compare.py")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "stages.png")
    ap.add_argument("--title", default=None, help="default: the machine of the first file")
    ap.add_argument("--unit", choices=["auto", "ms", "s"], default="auto")
    a = ap.parse_args(argv)
    bars: list[tuple[str, dict[str, float]]] = []
    first = None
    for path in a.json:
        data = json.loads(path.read_text())
        first = first or data
        b, missing = collect(data, prefix=path.stem if len(a.json) > 1 else "")
        bars += b
        for m in missing:
            print(f"not drawn (no stages): {m}")
    if not bars:
        print("no stage timings found in the given files", file=sys.stderr)
        return 1
    title = a.title if a.title is not None else f"Time per stage, one request. {describe(first)}"
    out = plot(bars, a.out, title, a.unit)
    for lab, s in bars:
        print(f"{lab}: total {sum(s.values()):.0f} ms (" + ", ".join(f"{k} {v:.0f}" for k, v in s.items()) + ")")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
