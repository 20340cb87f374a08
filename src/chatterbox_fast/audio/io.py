"""Reading reference audio: soundfile + the librosa 0.11 conventions the reference relies on (spec §1.1).

`librosa.load(path, sr=24000)` is: soundfile read as float32 -> mean over channels -> soxr_hq resample with the length
fixed to ceil(L * 24000 / sr). `load_wav_24k` reproduces it; `load_audio` is the general form. Unlike librosa there is
no audioread fallback: formats libsndfile cannot read (wav/flac/ogg/mp3 are fine) are an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..constants import S3GEN_SR
from .resample import resample_soxr

logger = logging.getLogger(__name__)

__all__ = ["AudioSource", "load_audio", "load_wav_24k"]

AudioSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    """(channels..., L) float32 as librosa reads it (soundfile, `always_2d=False`, transposed), and the rate."""
    import soundfile as sf

    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            y = f.read(dtype="float32", always_2d=False).T
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot read {path} as audio (soundfile: {exc})") from exc
    return y, sr


def _from_array(wav: np.ndarray | torch.Tensor, source_sr: int | None) -> tuple[np.ndarray, int]:
    if source_sr is None:
        raise TypeError("source_sr (the sample rate of the array) is required when passing an array")
    if isinstance(source_sr, (bool, np.bool_)) or not isinstance(source_sr, (int, float, np.integer, np.floating)) \
            or not float(source_sr).is_integer():
        raise ValueError(f"source_sr must be a whole number of Hz, got {source_sr!r}")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().to("cpu").numpy()
    if not np.issubdtype(wav.dtype, np.floating):
        raise TypeError(f"audio arrays must be floating point in [-1, 1], got {wav.dtype} "
                        "(divide int16 PCM by 32768)")
    return np.asarray(wav, dtype=np.float32), int(source_sr)  # files are read as float32 too


def _to_mono(y: np.ndarray) -> np.ndarray:
    """librosa.to_mono: mean over every axis but the last (channels-first layout)."""
    if y.ndim > 1:
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    return y


def _validate(y: np.ndarray, what: str, allow_silent: bool) -> None:
    if y.ndim == 0 or y.shape[-1] == 0:
        raise ValueError(f"{what}: empty audio (0 samples)")
    if not np.isfinite(y).all():
        raise ValueError(f"{what}: audio contains NaN or inf")
    if not allow_silent and not np.any(y):
        raise ValueError(f"{what}: audio is digital silence (all samples are 0); a voice reference needs speech")


def load_audio(
    source: AudioSource,
    sr: int | None = None,
    *,
    source_sr: int | None = None,
    allow_silent: bool = False,
) -> tuple[np.ndarray, int]:
    """Load `source` as mono float32, resampled to `sr` (None keeps the native rate). Returns (wav (L,), rate).

    `source` is a path (anything libsndfile reads, any channel count) or a float array at `source_sr`, laid out
    (L,) or (channels, L) as librosa expects. Multi-channel audio is averaged over channels and resampled with
    soxr_hq, bit-for-bit the way `librosa.load(path, sr=sr)` does it.

    Raises FileNotFoundError for a missing path, ValueError for unreadable, empty, non-finite or (unless
    `allow_silent`) all-zero audio, TypeError for integer arrays or a missing `source_sr`.
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        y, native_sr = _from_array(source, source_sr)
        what = "audio array"
    elif isinstance(source, (str, os.PathLike)):
        if source_sr is not None:
            raise TypeError("source_sr is only for arrays; a file carries its own sample rate")
        path = Path(source)
        y, native_sr = _read_file(path)
        what = str(path)
    else:
        raise TypeError(f"source must be a path or a float array, got {type(source).__name__}")
    if native_sr <= 0:
        raise ValueError(f"{what}: invalid sample rate {native_sr}")
    _validate(y, what, allow_silent=True)
    y = _to_mono(y)
    _validate(y, what, allow_silent)  # a stereo file whose channels cancel is silent too
    if sr is not None and sr != native_sr:
        y = resample_soxr(y, native_sr, sr)
    else:
        sr = native_sr
    return np.ascontiguousarray(y, dtype=np.float32), int(sr)


def load_wav_24k(source: AudioSource, *, source_sr: int | None = None, allow_silent: bool = False) -> np.ndarray:
    """`librosa.load(source, sr=24000)[0]`: the reference's `ref24` (spec §1.1 step 1), mono float32 at 24 kHz."""
    return load_audio(source, S3GEN_SR, source_sr=source_sr, allow_silent=allow_silent)[0]
