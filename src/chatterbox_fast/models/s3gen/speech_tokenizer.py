"""S3 speech tokenizer v2 (CosyVoice2 "speech_tokenizer_v2_25hz"): 128-bin log-mel at 100 fps -> 25 Hz tokens.

Spec §5. The network only: the log-mel front-end is `audio.mel.s3_tokenizer_log_mel` (16 kHz wav -> (128, T)).

  conv1 (k3 s2) + GELU -> conv2 (k3 s2) + GELU -> 6 x [x += attn(LN(x)); x += MLP(LN(x))] -> FSQ
  attn: q (bias), k (no bias), v (bias); RoPE (theta 1e4) on q and k; q, k each scaled by 64^-1/4; softmax over
        non-padded keys; plus an FSMN memory: depthwise conv k31 over the masked v, + masked v.
  FSQ:  h = 0.999 * tanh(project_down(x)) (8 dims); digit_i = round(h_i) + 1 in {0, 1, 2}; token = sum 3^i digit_i.

Module names mirror the `tokenizer.*` keys of s3gen.safetensors (weights live inside s3gen, there is no separate
file). The file also holds two front-end buffers of the reference, `tokenizer._mel_filters` [128, 201] (librosa
Slaney mel bank) and `tokenizer.window` [400] (periodic Hann); they are not part of this network and
`TOKENIZER_KEYMAP` drops them by name (the log-mel front-end recomputes both; see FRONTEND_KEYS).

Batching: (B, 128, T) mels with per-row `mel_lens`; padded frames are masked before each conv, padded keys are
excluded from attention and padded values from the FSMN memory, so a batch gives the tokens of one-by-one calls.
Token positions at or beyond `token_lens` are set to 0 (as the reference's own long-audio path pads).

Buffers: the RoPE cos/sin table is a non-persistent buffer. After building on the meta device and loading weights,
call `init_buffers()` (`load_s3_tokenizer` does it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_fast.weights import KeyMap, load_strict

# Reference front-end buffers stored under `tokenizer.` in s3gen.safetensors; not used by the network.
FRONTEND_KEYS = ("_mel_filters", "window")
TOKENIZER_KEYMAP = KeyMap(prefix="tokenizer.", drop=tuple(FRONTEND_KEYS))


@dataclass(frozen=True)
class S3TokenizerConfig:
    """Speech tokenizer v2, 25 Hz, 3^8 = 6561 codes (s3tokenizer.model_v2 defaults)."""

    n_mels: int = 128  # log-mel bins of the front-end
    n_state: int = 1280  # model width
    n_head: int = 20  # head dim 64
    n_layer: int = 6
    fsmn_kernel: int = 31  # depthwise FSMN memory, zero-padded 15 / 15
    mlp_ratio: int = 4  # MLP hidden 5120
    ln_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_positions: int = 2048  # the reference's table length (max tokens); 750 are ever used (see max_frames)
    fsq_dims: int = 8  # project_down width = number of base-3 digits
    fsq_levels: int = 3
    fsq_scale: float = 0.9990000128746033  # float32(0.999), applied after tanh, before rounding
    # Longer inputs take the reference's 30 s sliding-window path (s3tokenizer>=0.2), which is not implemented.
    max_frames: int = 3000
    use_sdpa: bool = True  # F.scaled_dot_product_attention; False = explicit fp32 softmax like the reference

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels**self.fsq_dims


def conv_out_len(lengths: Tensor) -> Tensor:
    """Frames after one Conv1d(k3, stride 2, pad 1): ceil(L / 2)."""
    return (lengths - 1) // 2 + 1


def _key_mask(lengths: Tensor, t: int) -> Tensor:
    """(B,) -> (B, t) bool, True on valid positions."""
    return torch.arange(t, device=lengths.device)[None] < lengths[:, None]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype (as the reference)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x: (B, T, H, D); cos, sin: (T, D) with the D/2 frequencies repeated twice."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class FSMNMultiHeadAttention(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        d = cfg.n_state
        self.n_head = cfg.n_head
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.fsmn_block = nn.Conv1d(d, d, cfg.fsmn_kernel, padding=0, groups=d, bias=False)
        self.fsmn_pad = ((cfg.fsmn_kernel - 1) // 2, cfg.fsmn_kernel - 1 - (cfg.fsmn_kernel - 1) // 2)
        self.scale = cfg.head_dim**-0.25  # applied to q and to k
        self.use_sdpa = cfg.use_sdpa

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, valid: Tensor | None) -> Tensor:
        """x: (B, T, D); cos/sin: (T, 64); valid: (B, T) bool or None (no padding). Returns (B, T, D)."""
        b, t, d = x.shape
        q = self.query(x).view(b, t, self.n_head, -1)  # (B, T, H, 64)
        k = self.key(x).view(b, t, self.n_head, -1)
        v = self.value(x)  # (B, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        memory = self._fsmn(v, valid)

        q = q.transpose(1, 2) * self.scale  # (B, H, T, 64)
        k = k.transpose(1, 2) * self.scale
        vh = v.view(b, t, self.n_head, -1).transpose(1, 2)
        key_mask = None if valid is None else valid[:, None, None, :]  # (B, 1, 1, T)
        if self.use_sdpa:
            att = F.scaled_dot_product_attention(q, k, vh, attn_mask=key_mask, scale=1.0)
        else:
            qk = q @ k.transpose(-1, -2)  # (B, H, T, T)
            if key_mask is not None:
                qk = qk.masked_fill(~key_mask, -1e10)
            att = torch.softmax(qk.float(), dim=-1).to(q.dtype) @ vh
        att = att.transpose(1, 2).reshape(b, t, d)
        return self.out(att) + memory

    def _fsmn(self, v: Tensor, valid: Tensor | None) -> Tensor:
        """Depthwise conv memory over the masked values, plus the values: (B, T, D) -> (B, T, D)."""
        if valid is not None:
            v = v * valid[..., None].to(v.dtype)
        m = self.fsmn_block(F.pad(v.transpose(1, 2), self.fsmn_pad)).transpose(1, 2) + v
        return m if valid is None else m * valid[..., None].to(v.dtype)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        d = cfg.n_state
        self.attn = FSMNMultiHeadAttention(cfg)
        self.attn_ln = LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = nn.Sequential(nn.Linear(d, d * cfg.mlp_ratio), nn.GELU(), nn.Linear(d * cfg.mlp_ratio, d))
        self.mlp_ln = LayerNorm(d, eps=cfg.ln_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, valid: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), cos, sin, valid)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoderV2(nn.Module):
    """(B, 128, T) log-mel -> (B, ceil(ceil(T/2)/2), 1280) hidden states. Keys `encoder.*`."""

    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_state, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_state, cfg.n_state, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.n_layer)])
        self.register_buffer("rope_cos", torch.empty(cfg.rope_positions, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.rope_positions, cfg.head_dim), persistent=False)
        if not self.rope_cos.is_meta:
            self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the RoPE table and put it on the device of the weights (needed after a meta-device build).

        Computed on the CPU whatever the device, with the same float32 ops as s3tokenizer's precompute_freqs_cis
        (polar of fp32 angles): the reference also builds its table on the CPU and moves it, so tables are bitwise
        equal to the reference's on every device.
        """
        cfg = self.cfg
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2)[: cfg.head_dim // 2].float() / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.rope_positions), inv).float()  # (P, 32)
        table = torch.polar(torch.ones_like(angles), angles)
        device = self.conv1.weight.device
        self.rope_cos = torch.cat((table.real, table.real), dim=-1).to(device)  # (P, 64)
        self.rope_sin = torch.cat((table.imag, table.imag), dim=-1).to(device)

    def forward(self, mels: Tensor, mel_lens: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """mels: (B, 128, T); mel_lens: (B,) or None (all T). Returns hidden (B, T4, 1280), lengths (B,) or None."""
        mask = None if mel_lens is None else _key_mask(mel_lens, mels.shape[-1])[:, None].to(mels.dtype)
        x = F.gelu(self.conv1(mels if mask is None else mels * mask))  # (B, 1280, T2)
        lens = None if mel_lens is None else conv_out_len(mel_lens)
        if lens is not None:
            x = x * _key_mask(lens, x.shape[-1])[:, None].to(x.dtype)
        x = F.gelu(self.conv2(x))  # (B, 1280, T4)
        lens = None if lens is None else conv_out_len(lens)
        valid = None if lens is None else _key_mask(lens, x.shape[-1])  # (B, T4) bool
        x = x.transpose(1, 2)  # (B, T4, 1280)
        t = x.shape[1]
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, valid)
        return x, lens


class FSQCodebook(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self.project_down = nn.Linear(cfg.n_state, cfg.fsq_dims)
        self.scale = cfg.fsq_scale
        powers = torch.empty(cfg.fsq_dims, dtype=torch.long)  # on meta: a placeholder, init_buffers fills it
        if not powers.is_meta:  # (meta math runs Python meta kernels: ~2 s of imports on first use)
            powers = cfg.fsq_levels ** torch.arange(cfg.fsq_dims, dtype=torch.long)
        self.register_buffer("powers", powers, persistent=False)

    def pre_round(self, hidden: Tensor) -> Tensor:
        """(B, T, 1280) -> (B, T, 8) float32 values in (-0.999, 0.999) that FSQ rounds to {-1, 0, 1}."""
        return self.project_down(hidden).float().tanh() * self.scale

    def encode(self, hidden: Tensor) -> Tensor:
        """(B, T, 1280) -> (B, T) long codes in [0, 3^8)."""
        digits = self.pre_round(hidden).round().long() + 1  # round half to even, as torch.round in the reference
        return (digits * self.powers.to(digits.device)).sum(-1)


class FSQVectorQuantization(nn.Module):
    """Holds the codebook under `_codebook` (key `quantizer._codebook.project_down.*`)."""

    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self._codebook = FSQCodebook(cfg)


class S3TokenizerV2(nn.Module):
    """Log-mel (B, 128, T) at 100 fps -> speech tokens (B, T4) at 25 Hz."""

    def __init__(self, cfg: S3TokenizerConfig = S3TokenizerConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoderV2(cfg)
        self.quantizer = FSQVectorQuantization(cfg)

    def init_buffers(self) -> None:
        self.encoder.init_buffers()
        cb = self.quantizer._codebook
        cb.powers = self.cfg.fsq_levels ** torch.arange(self.cfg.fsq_dims, dtype=torch.long,
                                                        device=cb.project_down.weight.device)

    def forward(self, mels: Tensor, mel_lens: Tensor) -> tuple[Tensor, Tensor]:
        """mels: (B, 128, T) log-mel, zero-padded past each row's length; mel_lens: (B,) valid frames.

        Returns tokens (B, T4) long with T4 = ceil(ceil(T/2)/2) (0 past each row's length) and token_lens (B,) long.
        """
        lens = self._check(mels, mel_lens)
        padded = bool((lens != mels.shape[-1]).any()) if not torch.compiler.is_compiling() else True
        hidden, token_lens = self.encoder(mels, lens if padded else None)
        tokens = self.quantizer._codebook.encode(hidden)
        if padded:
            tokens = tokens.masked_fill(~_key_mask(token_lens, tokens.shape[1]), 0)
        else:
            token_lens = torch.full_like(lens, hidden.shape[1])
        return tokens, token_lens

    def pre_round(self, mels: Tensor, mel_lens: Tensor) -> tuple[Tensor, Tensor]:
        """The FSQ values before rounding, (B, T4, 8) float32, and token_lens: for parity checks near a boundary."""
        lens = self._check(mels, mel_lens)
        hidden, token_lens = self.encoder(mels, lens)
        return self.quantizer._codebook.pre_round(hidden), token_lens

    def tokenize(self, log_mels: Tensor | Sequence[Tensor], max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Reference `S3Tokenizer.forward(wavs, max_len)` on precomputed log-mels.

        log_mels: one (128, T) log-mel, or a sequence of them of different lengths (zero-padded into a batch).
        max_len: keep only the first 4 * max_len frames of each (the T3 speech prompt uses max_len=150: 6 s).
        """
        if isinstance(log_mels, Tensor):
            log_mels = [log_mels]
        if not isinstance(log_mels, Sequence) or len(log_mels) == 0:
            raise TypeError("log_mels must be a (128, T) tensor or a non-empty sequence of them")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        mels = []
        for i, m in enumerate(log_mels):
            if not isinstance(m, Tensor) or m.ndim != 2 or m.shape[0] != self.cfg.n_mels:
                got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"log_mels[{i}] must be ({self.cfg.n_mels}, T), got {got}")
            mels.append(m if max_len is None else m[:, : 4 * max_len])
        lens = torch.tensor([m.shape[1] for m in mels], device=mels[0].device)
        batch = mels[0].new_zeros(len(mels), self.cfg.n_mels, int(lens.max()))
        for i, m in enumerate(mels):
            batch[i, :, : m.shape[1]] = m
        return self(batch, lens)

    def _check(self, mels: Tensor, mel_lens: Tensor) -> Tensor:
        cfg = self.cfg
        if not isinstance(mels, Tensor) or not mels.is_floating_point():
            raise TypeError("mels must be a floating-point tensor (B, 128, T)")
        if mels.ndim != 3 or mels.shape[1] != cfg.n_mels:
            raise ValueError(f"mels must be (B, {cfg.n_mels}, T), got {tuple(mels.shape)}")
        if not isinstance(mel_lens, Tensor) or mel_lens.shape != (mels.shape[0],) or mel_lens.is_floating_point():
            raise ValueError(f"mel_lens must be an integer tensor of shape ({mels.shape[0]},)")
        lens = mel_lens.to(device=mels.device, dtype=torch.long)
        if not torch.compiler.is_compiling():
            lo, hi = int(lens.min()), int(lens.max())
            if lo < 1 or hi > mels.shape[-1]:
                raise ValueError(f"mel_lens must lie in [1, {mels.shape[-1]}] (T of mels), got [{lo}, {hi}]")
            if hi > cfg.max_frames:
                raise ValueError(
                    f"log-mel of {hi} frames is longer than {cfg.max_frames} ({cfg.max_frames // 100} s): the "
                    "reference switches to a sliding-window path there, which is not implemented; truncate the "
                    "audio (TTS uses at most 10 s)"
                )
        return lens


def load_s3_tokenizer(state: Mapping[str, Tensor], cfg: S3TokenizerConfig = S3TokenizerConfig()) -> S3TokenizerV2:
    """Build on the meta device, assign the `tokenizer.*` tensors of an s3gen state dict (strict), init buffers."""
    with torch.device("meta"):
        model = S3TokenizerV2(cfg)
    load_strict(model, state, TOKENIZER_KEYMAP, name="s3gen.safetensors (tokenizer)")
    model.init_buffers()
    return model.eval()


__all__ = [
    "FRONTEND_KEYS",
    "S3TokenizerConfig",
    "S3TokenizerV2",
    "TOKENIZER_KEYMAP",
    "conv_out_len",
    "load_s3_tokenizer",
]
