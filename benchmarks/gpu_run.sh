#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no network there): installs the carried wheels, builds the random-weight
# checkpoint from its seeds with the reference's own modules, runs the CUDA tests, then times the reference and
# our engine side by side (benchmarks/compare.py) and our modes alone (benchmarks/inference.py, if present).
#
# Needs, in the repo root: .whl/ with the wheels listed in benchmarks/README.md (the image has torch, transformers,
# numpy, ...; we carry soundfile/soxr/cffi/pycparser for us, chatterbox-tts + its stack for the reference, and
# transformers 5.2.0 / tokenizers 0.22.2 pinned for the reference only). resemble-perth (37 MB) does not travel: the
# reference gets benchmarks/gpu_stub/perth (identity watermark) and ours runs without the watermark.
#
# usage (device tool): bash benchmarks/gpu_run.sh [quick|full]     writes JSON and logs to $OUT (default /tmp/gpu_out)
# Dry run on a CPU machine: DEVICE=cpu CKPT=~/.cache/chatterbox-fast/oracle/ckpt-... bash benchmarks/gpu_run.sh quick
# RANDOM WEIGHTS: every number here is speed (and parity), the audio is noise.
set -u
MODE="${1:-full}"
OUT="${OUT:-/tmp/gpu_out}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
log() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*"; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PY=python3
if [ -d .whl ] && [ -z "${SKIP_INSTALL:-}" ]; then
  log "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ours \
    .whl/soundfile-*.whl .whl/soxr-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl || log "ours: wheel install failed"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ref .whl/*.whl \
    || log "reference: wheel install failed"
fi
export PYTHONPATH="$ROOT/src:/tmp/site_ours:$ROOT/benchmarks"
REFPY=/tmp/refpy
cat > "$REFPY" <<EOF
#!/bin/sh
PYTHONPATH="/tmp/site_ref:$ROOT/benchmarks/gpu_stub:$ROOT/tests/reference" exec $PY "\$@"
EOF
chmod +x "$REFPY"
if [ -n "${REF_PYTHON:-}" ]; then REFPY="$REF_PYTHON"; fi

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
$PY - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
EOF

CKPT="${CKPT:-/tmp/ckpt}"
if [ ! -f "$CKPT/DONE" ]; then
  log "building the random-weight checkpoint in $CKPT (reference modules, fixed seeds)"
  timeout 240 "$REFPY" - "$CKPT" <<'EOF' > "$OUT/build.log" 2>&1
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(min(16, torch.get_num_threads()))
import build_ckpt
t = time.time()
build_ckpt.build(Path(sys.argv[1]))
(Path(sys.argv[1]) / "DONE").write_text("ok")
print(f"built in {time.time() - t:.0f} s")
EOF
  tail -3 "$OUT/build.log"
fi
[ -f "$CKPT/DONE" ] || { log "checkpoint build FAILED"; tail -40 "$OUT/build.log"; }

[ -n "${SKIP_CEILINGS:-}" ] || { log "ceilings"; timeout 60 $PY - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/ceilings.txt"
import sys, torch, common
dev = sys.argv[1]
if dev == "cuda":
    x = torch.empty(1 << 29, dtype=torch.float32, device=dev)  # 2 GiB: read+write copy bandwidth
    y = torch.empty_like(x)
    t = common.timeit(lambda: y.copy_(x), warmup=2, iters=10, sync=True)
    print(f"copy bandwidth (read+write) {2 * x.numel() * 4 / (t['min_ms'] * 1e-3) / 1e9:.0f} GB/s")
    print(f"read bandwidth (sum) {common.measure_read_bandwidth(1 << 31, device=dev):.0f} GB/s")
    print(f"bf16 GEMM 8192^3 {common.measure_gemm_gflops(8192, 8192, 8192, torch.bfloat16, device=dev) / 1e3:.0f} TFLOP/s")
    print(f"fp32 GEMM 4096^3 {common.measure_gemm_gflops(4096, 4096, 4096, torch.float32, device=dev) / 1e3:.0f} TFLOP/s")
EOF
}

if [ "$DEVICE" = "cuda" ]; then
  log "CUDA tests"
  timeout "${TESTS_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider ${TESTS:-tests/generation/test_cuda_graph.py tests/generation/test_decode.py tests/test_memory.py} \
    > "$OUT/tests.log" 2>&1; tail -15 "$OUT/tests.log"
fi

if [ "$MODE" = quick ]; then CASES=medium; STEPS="--max-steps 40"; else CASES=medium; STEPS=""; fi
log "compare: reference vs ours ($CASES)"
timeout "${COMPARE_TIMEOUT:-420}" $PY benchmarks/compare.py --ckpt-dir "$CKPT" --device "$DEVICE" --ref-python "$REFPY" \
  --cases "$CASES" $STEPS --voice "$CKPT/clips/voice_10s_24k.wav" --warmup 1 \
  ${MODES:+--modes $MODES} ${PROFILE:+--profile-dir $OUT --profile-modes $PROFILE} --runs "${RUNS:-2}" \
  ${REF_RUNS:+--ref-runs $REF_RUNS} ${NO_REF:+--no-reference} --out "$OUT/compare_$DEVICE.json" 2>&1 | tee "$OUT/compare.log" | grep -v "^  ours/" | tail -30

if [ -f benchmarks/inference.py ] && [ -z "${SKIP_INFERENCE:-}" ]; then
  log "inference.py: our modes alone"
  timeout "${INFERENCE_TIMEOUT:-200}" $PY benchmarks/inference.py --ckpt-dir "$CKPT" --device "$DEVICE" --quick \
    --budget-s $(( ${INFERENCE_TIMEOUT:-200} - 20 )) ${INF_MODES:+--modes $INF_MODES} \
    --out "$OUT/inference_$DEVICE.json" 2>&1 | tail -25
fi
log "done"
