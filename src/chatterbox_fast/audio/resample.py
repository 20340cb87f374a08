"""The two resamplers the reference uses (spec §1.1, §10.17).

- `resample_soxr`: librosa 0.11's default `librosa.resample(res_type="soxr_hq")`, used by `librosa.load(sr=24000)` and
  for the 24k->16k audio that feeds the T3 speech prompt and the VoiceEncoder. CPU/numpy (soxr).
- `resample_sinc_hann`: torchaudio's `transforms.Resample(orig, new)` with its defaults (windowed-sinc, Hann window,
  lowpass_filter_width 6, rolloff 0.99), used inside `S3Gen.embed_ref` for the 16 kHz audio of the S3Gen prompt tokens
  and CAMPPlus. Pure torch, any device; the polyphase kernel is cached per (orig, new, dtype, device).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resample_soxr", "resample_sinc_hann", "sinc_hann_kernel"]


def _check_rates(orig: int, target: int) -> tuple[int, int]:
    for name, value in (("orig", orig), ("target", target)):
        integral = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            raise TypeError(f"{name} sample rate must be an integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} sample rate must be positive, got {value}")
    return int(orig), int(target)


def resample_soxr(wav: np.ndarray, orig: int, target: int) -> np.ndarray:
    """Resample `wav` (..., L) along its last axis exactly as `librosa.resample(wav, orig_sr, target_sr)` does.

    soxr "soxr_hq" per channel, then the length is fixed to ceil(L * target / orig) (zero-padded or cut, librosa's
    `fix=True`), and the result has the input's float dtype.
    """
    orig, target = _check_rates(orig, target)
    wav = np.asarray(wav)
    if not np.issubdtype(wav.dtype, np.floating):
        raise TypeError(f"audio must be floating point, got {wav.dtype}")
    if wav.ndim == 0:
        raise ValueError("audio must have at least one dimension")
    if not np.isfinite(wav).all():
        raise ValueError("audio contains NaN or inf")
    if orig == target:
        return wav
    import soxr

    ratio = float(target) / orig  # same float expression as librosa, so ceil() agrees at the boundaries
    n_out = int(np.ceil(wav.shape[-1] * ratio))
    y = np.apply_along_axis(soxr.resample, -1, wav, in_rate=orig, out_rate=target, quality="soxr_hq")
    if y.shape[-1] > n_out:
        y = y[..., :n_out]
    elif y.shape[-1] < n_out:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n_out - y.shape[-1])])
    return np.asarray(y, dtype=wav.dtype)


def _reduced(orig: int, target: int) -> tuple[int, int]:
    g = math.gcd(orig, target)
    return orig // g, target // g


@lru_cache(maxsize=32)
def _kernel_cpu64(orig: int, target: int, lowpass_filter_width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc kernel (new, 1, 2*width + orig) in float64, on rates reduced by their gcd."""
    base = min(orig, target) * rolloff  # cut-off below the lower Nyquist (anti-aliasing, and edge artefacts)
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64, device="cpu")[None, None] / orig  # (1, 1, K)
    # (new, 1, 1): phase of each output sample within one period; float32 like torchaudio (the values are exact)
    phase = torch.arange(0, -target, -1, device="cpu")[:, None, None] / target
    t = (phase + idx) * base
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0, dtype=t.dtype, device="cpu"), t.sin() / t)
    kernel = kernel * (window * (base / orig))
    return kernel, width


@lru_cache(maxsize=64)
def _kernel(orig: int, target: int, lowpass_filter_width: int, rolloff: float, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, int]:
    # torchaudio builds the kernel in float64 on the CPU, stores it as float32 and moves it with the module.
    with torch.inference_mode(False):  # a cached tensor must not be an inference tensor
        kernel, width = _kernel_cpu64(orig, target, lowpass_filter_width, rolloff)
        return kernel.to(torch.float32).to(device=device, dtype=dtype), width


def sinc_hann_kernel(
    orig: int, target: int, *, lowpass_filter_width: int = 6, rolloff: float = 0.99,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """The cached (kernel (new, 1, K), width) pair of `resample_sinc_hann` for gcd-reduced rates."""
    orig, target = _check_rates(orig, target)
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    o, n = _reduced(orig, target)
    return _kernel(o, n, int(lowpass_filter_width), float(rolloff), dtype, torch.device(device))


def resample_sinc_hann(wav: torch.Tensor, orig: int, target: int, *, lowpass_filter_width: int = 6,
                       rolloff: float = 0.99) -> torch.Tensor:
    """torchaudio `Resample(orig, target)` (sinc_interp_hann) on (..., L) -> (..., ceil(L * target / orig)).

    Zero-padded at both ends, one strided conv1d with the polyphase kernel; runs on `wav`'s device and dtype.
    """
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"wav must be a torch.Tensor, got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise TypeError(f"wav must be floating point, got {wav.dtype}")
    if wav.dim() == 0:
        raise ValueError("wav must have at least one dimension")
    orig, target = _check_rates(orig, target)
    if orig == target:
        return wav
    o, n = _reduced(orig, target)
    kernel, width = _kernel(o, n, int(lowpass_filter_width), float(rolloff), wav.dtype, wav.device)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1])  # (N, L)
    length = x.shape[-1]
    x = F.pad(x, (width, width + o))
    y = F.conv1d(x[:, None], kernel, stride=o)  # (N, new, L/orig + 1)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)  # interleave the phases: (N, L')
    n_out = int(np.ceil(np.float32(n * length / o)))  # torchaudio rounds the length in float32
    return y[:, :n_out].reshape(*shape[:-1], -1)
