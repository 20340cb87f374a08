"""The four feature front-ends of the reference, in torch (spec §3.2, §3.3, §4, §5, §10.16).

- `s3gen_mel` (S3Gen prompt mel, 24 kHz): n_fft 1920 / hop 480, reflect-pad 720 and no centering, magnitude,
  Slaney 80 bins, ln(max(., 1e-5)).
- `s3_tokenizer_log_mel` (S3 tokenizer, 16 kHz): n_fft 400 / hop 160, centered (reflect), last frame dropped, power,
  Slaney 128 bins, log10 with a (max - 8) floor, (x + 4) / 4.
- `voice_encoder_mel` (VoiceEncoder, 16 kHz): n_fft 400 / hop 160, centered (reflect), power, Slaney 40 bins, no log.
- `kaldi_fbank` (CAMPPlus, 16 kHz): 400-sample frames every 160 in a 512-point FFT, snip edges, DC removal,
  pre-emphasis, povey window, power, Kaldi (HTK-mel) 80 bins, ln(max(., eps)).

Every function takes a 1-D waveform (L,) or a batch (B, L) of equal-length waveforms (torch or numpy, float) and runs
on the input's device and dtype. Filterbanks and windows are cached per (parameters, device, dtype).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import S3_SR, S3GEN_SR

__all__ = [
    "slaney_mel_filterbank",
    "kaldi_mel_banks",
    "s3gen_mel",
    "s3_tokenizer_log_mel",
    "voice_encoder_mel",
    "kaldi_fbank",
]

_CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# filterbanks and windows


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 bins per 200 Hz), logarithmic above (librosa, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, min_log_mel + np.log(np.maximum(f, 1e-300) / 1000.0) / logstep, mels)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, 1000.0 * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=16)
def _slaney_bank_np(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)  # (F,)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))  # (M+2,)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)  # (M+2, F)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # float64 triangles stored as float32, then the float64 Slaney area norm applied in place: librosa's rounding
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None]
    return weights


def slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32 CPU tensor equal to `librosa.filters.mel(sr=..., n_fft=..., n_mels=...,
    fmin=..., fmax=...)` (Slaney scale, Slaney area norm). Cached; do not modify the returned tensor in place."""
    fmax = float(sr) / 2 if fmax is None else float(fmax)
    if not (sr > 0 and n_fft > 0 and n_mels > 0):
        raise ValueError(f"bad filterbank parameters sr={sr}, n_fft={n_fft}, n_mels={n_mels}")
    if not 0.0 <= fmin < fmax <= sr / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sr/2, got fmin={fmin}, fmax={fmax}, sr={sr}")
    return _slaney_bank(int(sr), int(n_fft), int(n_mels), float(fmin), fmax, _CPU, torch.float32)


@lru_cache(maxsize=64)
def _slaney_bank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        bank = torch.from_numpy(_slaney_bank_np(sr, n_fft, n_mels, fmin, fmax).copy())
        return bank.to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _kaldi_bank_cpu(num_bins: int, padded_window: int, sample_freq: float, low_freq: float,
                    high_freq: float) -> torch.Tensor:
    """torchaudio `kaldi.get_mel_banks` (no VTLN), computed with the same float32 ops so it matches bit for bit."""
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad fbank band low={low_freq}, high={high_freq} for nyquist {nyquist}")
    fft_bin_width = sample_freq / padded_window
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)  # HTK mel: 1127 ln(1 + f/700)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)  # triangles overlap by half: num_bins + 1 steps
    b = torch.arange(num_bins, device=_CPU).unsqueeze(1)  # (M, 1) int64
    left = mel_low + b * delta  # float32, as in torchaudio
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = 1127.0 * (1.0 + fft_bin_width * torch.arange(float(padded_window // 2), device=_CPU) / 700.0).log()
    mel = mel.unsqueeze(0)  # (1, F-1)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    bins = torch.max(torch.zeros(1, device=_CPU), torch.min(up, down))  # (M, F-1)
    return F.pad(bins, (0, 1))  # the Nyquist bin gets weight 0: (M, F)


def kaldi_mel_banks(num_bins: int = 80, padded_window: int = 512, sample_freq: float = 16000.0,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """(num_bins, padded_window // 2 + 1) float32 Kaldi/HTK triangular mel bank (no area norm), Nyquist column 0.
    `high_freq <= 0` is an offset from Nyquist (Kaldi convention). Cached; do not modify in place."""
    if num_bins <= 3:
        raise ValueError("Kaldi fbank needs at least 4 mel bins")
    if padded_window <= 0 or padded_window % 2:
        raise ValueError(f"padded_window must be even and positive, got {padded_window}")
    with torch.inference_mode(False):
        return _kaldi_bank_cpu(int(num_bins), int(padded_window), float(sample_freq), float(low_freq),
                               float(high_freq))


@lru_cache(maxsize=64)
def _kaldi_bank(num_bins: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        return kaldi_mel_banks(num_bins).to(device=device, dtype=dtype)


@lru_cache(maxsize=32)
def _window(kind: str, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        if kind == "hann":  # periodic, = torch.hann_window(n) = scipy/librosa 'hann' with fftbins=True
            return torch.hann_window(n, periodic=True, device=device, dtype=dtype)
        if kind == "povey":  # Kaldi: symmetric Hann to the power 0.85 (zero at both edges)
            return torch.hann_window(n, periodic=False, device=device, dtype=dtype).pow(0.85)
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _as_batch(wav, name: str, min_len: int) -> tuple[torch.Tensor, bool]:
    """(B, L) floating tensor and whether the input was 1-D."""
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.array(wav, copy=not wav.flags.writeable, order="C"))
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {wav.dtype}")
    if wav.dim() not in (1, 2):
        raise ValueError(f"{name} must be (L,) or (B, L), got shape {tuple(wav.shape)}")
    single = wav.dim() == 1
    x = wav[None] if single else wav
    if x.shape[-1] < min_len:
        raise ValueError(f"{name} has {x.shape[-1]} samples; this front-end needs at least {min_len}")
    return x, single


# ----------------------------------------------------------------------------------------------------------------
# front-ends


def s3gen_mel(wav24: torch.Tensor) -> torch.Tensor:
    """S3Gen prompt mel (Matcha/CosyVoice `mel_spectrogram` at 24 kHz): (L,) or (B, L) -> (B, 80, L // 480).

    Reflect-pad 720 both sides, STFT n_fft 1920 / hop 480 / periodic Hann, center=False;
    magnitude sqrt(re^2 + im^2 + 1e-9); Slaney mel (80 bins, 0-8 kHz); ln(max(., 1e-5)).
    """
    n_fft, hop, pad = 1920, 480, (1920 - 480) // 2
    x, _ = _as_batch(wav24, "wav24", min_len=pad + 1)  # reflect padding needs more samples than the pad
    x = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]  # (B, L + 1440)
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=_window("hann", n_fft, x.device, x.dtype),
                      center=False, normalized=False, onesided=True, return_complex=True)  # (B, 961, T)
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    fb = _slaney_bank(S3GEN_SR, n_fft, 80, 0.0, 8000.0, x.device, x.dtype)  # (80, 961)
    mel = torch.matmul(fb, mag)  # (B, 80, T)
    return torch.log(torch.clamp(mel, min=1e-5))


def s3_tokenizer_log_mel(wav16: torch.Tensor) -> torch.Tensor:
    """S3 tokenizer (Whisper-style) log-mel: (L,) -> (128, L // 160); (B, L) -> (B, 128, L // 160).

    STFT n_fft 400 / hop 160 / periodic Hann, centered with reflect padding, last frame dropped; power |X|^2;
    Slaney mel (128 bins, 0-8 kHz); log10(max(., 1e-10)); floor at (max over the utterance) - 8; (x + 4) / 4.
    Each row of a batch gets its own max, as the reference computes one utterance at a time.
    """
    n_fft, hop = 400, 160
    x, single = _as_batch(wav16, "wav16", min_len=n_fft // 2 + 1)
    spec = torch.stft(x, n_fft, hop_length=hop, window=_window("hann", n_fft, x.device, x.dtype),
                      center=True, pad_mode="reflect", return_complex=True)  # (B, 201, T + 1)
    power = spec[..., :-1].abs() ** 2
    fb = _slaney_bank(S3_SR, n_fft, 128, 0.0, 8000.0, x.device, x.dtype)  # (128, 201)
    log_spec = torch.clamp(torch.matmul(fb, power), min=1e-10).log10()  # (B, 128, T)
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec[0] if single else log_spec


def voice_encoder_mel(wav16: torch.Tensor) -> torch.Tensor:
    """VoiceEncoder mel: (L,) -> (1 + L // 160, 40); (B, L) -> (B, T, 40). Linear power, no log.

    STFT n_fft 400 / hop 160 / periodic Hann, centered with reflect padding (librosa.stft(center=True,
    pad_mode="reflect")); |X|^2; Slaney mel (40 bins, 0-8 kHz). Float32 input gets a float64 FFT, as in librosa.
    """
    n_fft, hop = 400, 160
    x, single = _as_batch(wav16, "wav16", min_len=n_fft // 2 + 1)
    # librosa runs the FFT in float64 and stores complex64: do the same where float64 exists (not MPS). Small mel
    # bins then agree to ~1e-6 relative instead of ~1e-3 with a float32 FFT.
    wide = x.dtype == torch.float32 and x.device.type != "mps"
    xs = x.double() if wide else x
    spec = torch.stft(xs, n_fft, hop_length=hop, win_length=n_fft, window=_window("hann", n_fft, xs.device, xs.dtype),
                      center=True, pad_mode="reflect", return_complex=True)  # (B, 201, T)
    if wide:
        spec = spec.to(torch.complex64)
    power = spec.abs() ** 2
    fb = _slaney_bank(S3_SR, n_fft, 40, 0.0, 8000.0, x.device, x.dtype)  # (40, 201)
    mel = torch.matmul(fb, power).transpose(1, 2)  # (B, T, 40)
    return mel[0] if single else mel


def kaldi_fbank(wav16: torch.Tensor, num_mel_bins: int = 80) -> torch.Tensor:
    """`torchaudio.compliance.kaldi.fbank(wav16[None], num_mel_bins=...)` with its defaults:
    (L,) -> (T, num_mel_bins); (B, L) -> (B, T, num_mel_bins), T = 1 + (L - 400) // 160.

    25 ms / 10 ms frames with snip_edges, dither 0, per-frame DC removal, pre-emphasis 0.97 (first sample against
    itself), povey window, zero-padded to a 512-point FFT, power spectrum, Kaldi HTK-style mel bank 20 Hz..Nyquist,
    ln(max(., float32 eps)), no energy column. The waveform is used as is, in [-1, 1] (no int16 scaling).
    No mean normalisation here: CAMPPlus subtracts the per-utterance mean itself.
    """
    win, shift, n_fft = 400, 160, 512
    x, single = _as_batch(wav16, "wav16", min_len=win)
    frames = x.unfold(-1, win, shift)  # (B, T, 400), snip_edges
    frames = frames - frames.mean(dim=-1, keepdim=True)
    prev = torch.cat((frames[..., :1], frames[..., :-1]), dim=-1)
    frames = frames - 0.97 * prev
    frames = frames * _window("povey", win, x.device, x.dtype)
    frames = F.pad(frames, (0, n_fft - win))  # (B, T, 512)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (B, T, 257)
    fb = _kaldi_bank(int(num_mel_bins), x.device, x.dtype)  # (M, 257)
    mel = torch.matmul(power, fb.T)  # (B, T, M)
    eps = torch.finfo(torch.float32).eps  # torchaudio's floor is float32 eps whatever the dtype
    out = torch.clamp(mel, min=eps).log()
    return out[0] if single else out
