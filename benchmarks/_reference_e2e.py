"""Reference end-to-end timing (chatterbox-tts 0.1.7). Runs in the REFERENCE python; prints one JSON object last.

Started by benchmarks/compare.py as a subprocess (same cases, same checkpoint). Loads `ChatterboxTTS.from_local`,
times `prepare_conditionals` on a clip, then `generate(text)` per case with the stage breakdown taken by wrapping
the reference's own methods (each wrapper synchronises CUDA):
- t3: `T3.inference` (its first backend forward is the prefill; decode = the rest);
- flow: `S3Gen.flow_inference`; hift: `S3Gen.hift_inference`; watermark: `apply_watermark`.
Random weights: the stop and start logits are pushed to -1e9 in the backend output, so every case runs exactly its
number of decode steps (the reference's generate() hard-codes max_new_tokens=1000: `T3.inference` is wrapped to
pass the case's count) and its token clean-up never sees a second start token.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

import common  # benchmarks/common.py (this script's folder is on sys.path when it is run as a script)

START_SPEECH, STOP_SPEECH = 6561, 6562


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--cases", type=Path, required=True, help="JSON list of {name, text, steps}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--voice", type=Path, help="clip for the conditioning stage (default: built-in conds.pt only)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wav-dir", type=Path)
    a = ap.parse_args()

    logging.disable(logging.WARNING)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from chatterbox.models.t3.inference import t3_hf_backend
    from chatterbox.tts import ChatterboxTTS

    cases = json.loads(a.cases.read_text())
    result = {"impl": "reference", "torch": torch.__version__, "device": a.device, "cases": {}}
    t0 = time.perf_counter()
    tts = ChatterboxTTS.from_local(a.ckpt, device=a.device)
    result["load_s"] = time.perf_counter() - t0
    timer = common.StageTimer(a.device.startswith("cuda"))
    st = {"calls": 0, "steps": 0}

    backend_forward = t3_hf_backend.T3HuggingfaceBackend.forward

    def forward(self, inputs_embeds, *args, **kwargs):
        timer.sync()
        t = time.perf_counter()
        out = backend_forward(self, inputs_embeds, *args, **kwargs)
        out.logits[..., STOP_SPEECH] = -1e9
        out.logits[..., START_SPEECH] = -1e9
        timer.sync()
        if st["calls"] == 0:
            timer.ms["t3_prefill"] = (time.perf_counter() - t) * 1e3
        st["calls"] += 1
        return out

    t3_hf_backend.T3HuggingfaceBackend.forward = forward
    t3_inference = tts.t3.inference

    def capped(*args, **kwargs):
        kwargs["max_new_tokens"] = st["steps"]
        return t3_inference(*args, **kwargs)

    tts.t3.inference = timer.wrap("t3", capped)
    tts.s3gen.flow_inference = timer.wrap("flow", tts.s3gen.flow_inference)
    tts.s3gen.hift_inference = timer.wrap("hift", tts.s3gen.hift_inference)
    tts.watermarker.apply_watermark = timer.wrap("watermark", tts.watermarker.apply_watermark)

    if a.voice is not None:  # conditioning stage: a fresh voice from a clip (then back to the built-in voice)
        builtin = tts.conds
        for i in range(a.warmup + 1):
            timer.sync()
            t = time.perf_counter()
            tts.prepare_conditionals(str(a.voice), exaggeration=0.5)
            timer.sync()
            result["conditioning_ms"] = (time.perf_counter() - t) * 1e3
        tts.conds = builtin

    for case in cases:
        runs = []
        st["steps"] = case["steps"]
        for r in range(a.warmup + a.runs):
            timer.ms = {}
            st["calls"] = 0
            if a.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(a.seed + r)
            timer.sync()
            t = time.perf_counter()
            wav = tts.generate(case["text"])
            timer.sync()
            total = (time.perf_counter() - t) * 1e3
            if r < a.warmup:
                continue
            ms = dict(timer.ms)
            stages = {
                "t3_prefill_ms": ms.get("t3_prefill", 0.0),
                "t3_decode_ms": ms.get("t3", 0.0) - ms.get("t3_prefill", 0.0),
                "flow_ms": ms.get("flow", 0.0),
                "hift_ms": ms.get("hift", 0.0),
                "watermark_ms": ms.get("watermark", 0.0),
            }
            stages["other_ms"] = total - sum(stages.values())
            n = wav.shape[-1]
            run = {"total_ms": total, "stages": stages, "decode_steps": st["calls"] - 1,
                   "samples": n, "audio_s": n / tts.sr}
            if a.device.startswith("cuda"):
                run["gpu_peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1e9
            runs.append(run)
            if a.wav_dir is not None and r == a.warmup:
                import soundfile as sf

                a.wav_dir.mkdir(parents=True, exist_ok=True)
                sf.write(str(a.wav_dir / f"reference_{case['name']}.wav"), wav.squeeze(0).numpy(), tts.sr)
        result["cases"][case["name"]] = runs
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
