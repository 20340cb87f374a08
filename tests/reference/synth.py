"""Deterministic speech-like test audio (numpy only; no espeak, no downloads).

Voiced "syllables" (harmonic stack with a moving f0 and a crude formant envelope), unvoiced noise bursts and short
pauses. Not speech, but it exercises every front-end the way speech does (silence trimming, pitch, energy changes).
"""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, sr: int = 24000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n, dtype=np.float64)
    t = 0
    while t < n:
        kind = rng.choice(["voiced", "voiced", "voiced", "noise", "pause"])
        dur = int(sr * rng.uniform(0.08, 0.26))
        seg = min(dur, n - t)
        tt = np.arange(seg) / sr
        env = np.sin(np.pi * np.arange(seg) / max(seg, 1)) ** 0.7
        if kind == "voiced":
            f0 = rng.uniform(95, 230) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * tt))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formants = rng.uniform([400, 1100, 2300], [900, 2000, 3200])
            sig = np.zeros(seg)
            for h in range(1, 30):
                fh = h * f0.mean()
                if fh > sr / 2 - 500:
                    break
                gain = sum(np.exp(-((fh - f) / 180.0) ** 2) for f in formants) + 0.02
                sig += gain * np.sin(h * phase) / h**0.5
            out[t:t + seg] = 0.25 * env * sig / (np.abs(sig).max() + 1e-9)
        elif kind == "noise":
            sig = rng.standard_normal(seg)
            sig = np.diff(sig, prepend=0.0)  # crude high-pass: fricative-like
            out[t:t + seg] = 0.05 * env * sig / (np.abs(sig).max() + 1e-9)
        t += seg
    out += 1e-4 * rng.standard_normal(n)  # room noise floor
    return out.astype(np.float32)


# name -> (seconds, sample rate, channels, seed); lengths chosen for the quirks they hit (see spec §3.1, §10.10)
CLIPS = {
    "voice_9p5s_24k": (9.5, 24000, 1, 1),  # 228000 samples -> 475 prompt mel frames (odd), 237 tokens
    "voice_6s_24k": (6.0, 24000, 1, 2),  # 300 mel frames (even)
    "voice_10s_24k": (10.0, 24000, 1, 3),  # exactly the S3Gen prompt cap
    "voice_12s_44k_stereo": (12.0, 44100, 2, 4),  # longer than both caps, odd rate, two channels
    "voice_0p5s_16k": (0.5, 16000, 1, 5),  # very short
}


def write_clips(directory) -> None:
    import soundfile as sf
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, (sec, sr, ch, seed) in CLIPS.items():
        wav = speech_like(sec, sr, seed)
        if ch == 2:
            wav = np.stack([wav, 0.6 * np.roll(wav, 37)], axis=1)
        sf.write(directory / f"{name}.wav", wav, sr, subtype="FLOAT")
