"""Reference S3Gen flow + HiFT timing. Runs in the ORACLE venv (chatterbox-tts 0.1.7); prints one JSON object on stdout.

Started by benchmarks/s3gen.py as a subprocess. Builds the reference `S3Gen()` only, loads s3gen.safetensors and
times `S3Gen.flow_inference(tokens, ref_dict=prompt, n_cfm_timesteps=10, finalize=True)` and then
`S3Gen.hift_inference(mel)` (the path `S3Gen.inference` takes) on the synthetic prompt of `prompt_inputs` (same
function, same values, as s3gen.py).
The estimator is wrapped to time each of its calls as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch


def prompt_inputs(n_tokens: int, prompt_tokens: int, prompt_frames: int) -> dict[str, torch.Tensor]:
    """Deterministic synthetic inputs (values do not affect speed). Same as benchmarks/s3gen.py."""
    g = torch.Generator().manual_seed(0)
    return {
        "speech_tokens": torch.randint(0, 6561, (1, n_tokens), generator=g),
        "prompt_token": torch.randint(0, 6561, (1, prompt_tokens), generator=g),
        "prompt_feat": torch.randn(1, prompt_frames, 80, generator=g),
        "embedding": torch.randn(1, 192, generator=g),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=125)
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--prompt-frames", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    logging.disable(logging.WARNING)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    from chatterbox.models.s3gen import S3Gen
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    model = S3Gen()
    model.load_state_dict(load_file(str(a.ckpt / "s3gen.safetensors")), strict=True)
    model = model.to(a.device).eval()
    load_s = time.perf_counter() - t0

    x = prompt_inputs(a.tokens, a.prompt_tokens, a.prompt_frames)
    ref = {
        "prompt_token": x["prompt_token"].to(a.device),
        "prompt_token_len": torch.tensor([a.prompt_tokens], device=a.device),
        "prompt_feat": x["prompt_feat"].to(a.device),
        "prompt_feat_len": None,
        "embedding": x["embedding"].to(a.device),
    }
    tokens = x["speech_tokens"].to(a.device)

    est = model.flow.decoder.estimator
    orig = est.forward
    est_ms: list[float] = []

    def timed(*args, **kwargs):
        _sync(a.device)
        t = time.perf_counter()
        out = orig(*args, **kwargs)
        _sync(a.device)
        est_ms.append((time.perf_counter() - t) * 1e3)
        return out

    est.forward = timed
    times, hift_times = [], []
    for i in range(a.warmup + a.iters):
        if i == a.warmup:
            est_ms.clear()
        _sync(a.device)
        t = time.perf_counter()
        mel = model.flow_inference(tokens, ref_dict=dict(ref), n_cfm_timesteps=10, finalize=True)
        _sync(a.device)
        if i >= a.warmup:
            times.append((time.perf_counter() - t) * 1e3)
        _sync(a.device)
        t = time.perf_counter()
        wav, _ = model.hift_inference(mel)
        _sync(a.device)
        if i >= a.warmup:
            hift_times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({
        "load_s": load_s,
        "flow_ms": {"min_ms": min(times), "median_ms": statistics.median(times), "iters": len(times)},
        "flow_all_ms": times,
        "hift_all_ms": hift_times,
        "estimator_all_ms": est_ms,
        "hift_ms": {"min_ms": min(hift_times), "median_ms": statistics.median(hift_times), "iters": len(hift_times)},
        "wav_samples": wav.shape[-1],
        "estimator_call_ms": {"min_ms": min(est_ms), "median_ms": statistics.median(est_ms), "calls": len(est_ms)},
        "mel_shape": list(mel.shape),
        "threads": torch.get_num_threads(),
        "device": a.device,
    }))


if __name__ == "__main__":
    main()
