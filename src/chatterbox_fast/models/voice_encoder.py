"""VoiceEncoder: the 256-d speaker d-vector that conditions T3 (spec §4, §10.14).

A 3-layer LSTM over 160-frame windows ("partials") of a 40-bin linear power mel, projected and L2-normalised per
partial; the utterance embedding is the L2-normalised mean of the partial embeddings. Module names mirror the keys of
`ve.safetensors` (lstm.*, proj.*, similarity_weight/bias), so the checkpoint loads strictly with an identity key map.

Build on the meta device and load with `build_voice_encoder(state)`. On CUDA, call `ve.lstm.flatten_parameters()`
after moving the module, so cuDNN gets one contiguous weight buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..audio.mel import voice_encoder_mel
from ..constants import S3_SR
from ..weights import KeyMap, load_strict

logger = logging.getLogger(__name__)

__all__ = ["VoiceEncoderConfig", "VoiceEncoder", "VE_KEYMAP", "build_voice_encoder", "trim_silence",
           "partial_layout"]


@dataclass(frozen=True)
class VoiceEncoderConfig:
    """Defaults are the released model (the reference's `VoiceEncConfig` plus `embeds_from_wavs` defaults)."""

    sample_rate: int = S3_SR  # input audio rate; other rates are the caller's job
    n_mels: int = 40  # LSTM input size (mel front-end is fixed: n_fft 400, hop 160, Slaney 0-8 kHz, power, no log)
    hidden_size: int = 256  # LSTM hidden size
    num_layers: int = 3
    embed_size: int = 256  # d-vector size (proj output)
    final_relu: bool = True  # ReLU after proj, before the L2 norm
    partial_frames: int = 160  # frames per partial (1.6 s)
    rate: float = 1.3  # partials per second: step = round((sr / rate) / partial_frames) = 77 frames (quirky formula)
    min_coverage: float = 0.8  # a trailing partial is kept if at least this much of it is real frames
    trim_top_db: float = 20.0  # silence trim threshold below the loudest frame (librosa.effects.trim)
    trim_frame_length: int = 2048
    trim_hop_length: int = 512

    @property
    def partial_step(self) -> int:
        """Frames between partial starts (77 for the defaults)."""
        step = int(np.round((self.sample_rate / self.rate) / self.partial_frames))
        if not 0 < step <= self.partial_frames:
            raise ValueError(f"partial step {step} out of (0, {self.partial_frames}]")
        return step


VE_KEYMAP = KeyMap()  # ve.safetensors keys are the module's own: 16 tensors, nothing dropped


def partial_layout(n_frames: int, cfg: VoiceEncoderConfig = VoiceEncoderConfig()) -> tuple[int, int]:
    """(number of partials, mel length they cover) for an `n_frames` mel, the reference's `get_num_wins` rule.

    n, rem = divmod(max(T - P + step, 0), step); one more partial if n == 0 or the trailing one would hold at least
    `min_coverage` real frames; the mel is zero-padded (or cut) to P + step * (n - 1).
    """
    if n_frames <= 0:
        raise ValueError(f"need at least one mel frame, got {n_frames}")
    win, step = cfg.partial_frames, cfg.partial_step
    n, rem = divmod(max(n_frames - win + step, 0), step)
    if n == 0 or (rem + (win - step)) / win >= cfg.min_coverage:
        n += 1
    return n, win + step * (n - 1)


def trim_silence(wav: Tensor, top_db: float = 20.0, frame_length: int = 2048,
                 hop_length: int = 512) -> tuple[Tensor, tuple[int, int]]:
    """`librosa.effects.trim(wav, top_db)`: cut leading/trailing frames quieter than `top_db` below the loudest one.

    Frame energy is the mean square over `frame_length` samples of the zero-padded (centered) signal every
    `hop_length`; a frame is non-silent if 10 log10(max(e, 1e-10) / max(e_max, 1e-10)) > -top_db. Returns
    (wav[start:end], (start, end)) with start = first * hop, end = min(L, (last + 1) * hop). Energies are computed in
    float64 (float32 on MPS); only a frame within ~1e-5 dB of the threshold could be classed differently from the
    reference's float32 computation.
    Synchronises with the host (the cut points are data-dependent).
    """
    if wav.dim() != 1:
        raise ValueError(f"trim_silence expects (L,), got {tuple(wav.shape)}")
    length = wav.shape[0]
    if length == 0:
        raise ValueError("cannot trim empty audio")
    acc = torch.float32 if wav.device.type == "mps" else torch.float64
    half = frame_length // 2
    x = F.pad(wav.to(acc), (half, half))  # constant (zero) padding, librosa.feature.rms(center=True)
    frames = x.unfold(0, frame_length, hop_length)  # (1 + L // hop, frame_length)
    energy = frames.square().mean(dim=-1)
    amin = 1e-10
    db = 10.0 * torch.log10(energy.clamp(min=amin)) - 10.0 * torch.log10(energy.max().clamp(min=amin))
    idx = torch.nonzero(db > -top_db).flatten()
    if idx.numel() == 0:  # impossible with ref = max (the loudest frame is 0 dB), kept for safety
        return wav[:0], (0, 0)
    first, last = idx[[0, -1]].tolist()
    start, end = first * hop_length, min(length, (last + 1) * hop_length)
    return wav[start:end], (start, end)


class VoiceEncoder(nn.Module):
    """Partials (N, 160, 40) -> L2-normalised d-vectors (N, 256); `embeds_from_wav` does the whole utterance."""

    def __init__(self, cfg: VoiceEncoderConfig = VoiceEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.n_mels, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.embed_size)
        # GE2E cosine-similarity scale/offset: training only, kept so ve.safetensors loads with nothing left over
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]), requires_grad=False)
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]), requires_grad=False)

    def forward(self, partials: Tensor) -> Tensor:
        """(N, P, n_mels) linear power mels -> (N, embed_size) unit-norm embeddings."""
        _, (hidden, _) = self.lstm(partials)  # hidden: (num_layers, N, H)
        raw = self.proj(hidden[-1])  # (N, E)
        if self.cfg.final_relu:
            raw = F.relu(raw)
        return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True)

    def partials_from_mel(self, mel: Tensor) -> Tensor:
        """(T, n_mels) mel -> (N, P, n_mels) overlapping windows, zero-padded per `partial_layout`."""
        n, target = partial_layout(mel.shape[0], self.cfg)
        if target > mel.shape[0]:
            mel = F.pad(mel, (0, 0, 0, target - mel.shape[0]))
        mel = mel[:target]
        return mel.unfold(0, self.cfg.partial_frames, self.cfg.partial_step).transpose(1, 2)  # (N, P, M)

    def embed_mel(self, mel: Tensor) -> Tensor:
        """(T, n_mels) mel of one utterance -> (1, embed_size): mean of the partial embeddings, L2-normalised.
        All partials go through the LSTM as one batch."""
        partial_embeds = self(self.partials_from_mel(mel))  # (N, E)
        raw = partial_embeds.mean(dim=0, keepdim=True)
        return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True)

    def embeds_from_wav(self, wav16: Tensor | np.ndarray, trim: bool = True) -> Tensor:
        """The reference's `embeds_from_wavs([wav16], 16000)` for one 16 kHz utterance (L,) -> (1, embed_size).

        Silence trim (top_db 20), VE mel, partials of 160 frames every 77, LSTM, per-partial L2 norm, mean, L2 norm.
        Runs on the module's device; the trim and mel are computed in fp32 whatever the module's dtype.
        Raises ValueError for non-finite, too-short or degenerate (zero-embedding) audio.
        """
        param = self.proj.weight
        wav = torch.as_tensor(wav16).to(device=param.device, dtype=torch.float32)
        if wav.dim() != 1:
            raise ValueError(f"embeds_from_wav expects one utterance (L,), got {tuple(wav.shape)}")
        if wav.numel() == 0 or not bool(torch.isfinite(wav).all()):
            raise ValueError("voice encoder input is empty or contains NaN/inf")
        if trim and self.cfg.trim_top_db:
            wav, _ = trim_silence(wav, self.cfg.trim_top_db, self.cfg.trim_frame_length, self.cfg.trim_hop_length)
        embed = self.embed_mel(voice_encoder_mel(wav).to(param.dtype))
        if not bool(torch.isfinite(embed).all()):
            raise ValueError("voice encoder produced no usable embedding (all partials map to zero): "
                             "the reference audio is silent or degenerate")
        return embed


def build_voice_encoder(state: Mapping[str, Tensor], cfg: VoiceEncoderConfig = VoiceEncoderConfig(),
                        dtype: torch.dtype | None = None) -> VoiceEncoder:
    """A VoiceEncoder built on the meta device and strictly loaded from `state` (the ve.safetensors tensors)."""
    with torch.device("meta"):
        ve = VoiceEncoder(cfg)
    load_strict(ve, state, VE_KEYMAP, name="ve.safetensors", dtype=dtype)
    return ve.eval().requires_grad_(False)
