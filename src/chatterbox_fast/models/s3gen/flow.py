"""S3Gen flow: speech tokens + voice prompt -> 80-bin log-mel at 50 Hz (spec §3.4-3.6).

    tokens = [prompt tokens, generated tokens]                      (B, N = Np + Ng)
    h      = encoder(input_embedding(tokens) * pad_mask)            (B, T = 2N, 512)
    mu     = encoder_proj(h)                                        (B, T, 80)
    spks   = spk_embed_affine_layer(normalize(x-vector))            (B, 80)
    cond   = prompt mel in the first P frames, 0 after              (B, T, 80)
    mel    = Euler-CFM(noise, mu, spks, cond)[:, :, P:]             (B, 80, T - P)

P = prompt_feat.shape[1], which is 2*Np + 1 for an odd prompt mel (the generated mel then has 2*Ng - 1 frames).
The CFM integrates 10 Euler steps on the cosine grid t = 1 - cos(pi/2 s) with classifier-free guidance
v = (1 + w) v_cond - w v_uncond, w = 0.7; the cond and uncond rows run as ONE batch of 2B through the estimator,
in a preallocated time-major input buffer whose mu/spks/cond part is written once per solve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...constants import SPEECH_VOCAB_SIZE
from ...weights import KeyMap, embedding
from .encoder import ConformerEncoderConfig, UpsampleConformerEncoder
from .estimator import ConditionalDecoder, EstimatorConfig

__all__ = ["FlowConfig", "S3GenFlow", "CausalCFM", "FLOW_KEYMAP", "cosine_t_span", "solve_euler_cfg"]

# `flow.*` keys of s3gen.safetensors map 1:1 onto S3GenFlow (no training-only tensors live under `flow.`).
FLOW_KEYMAP = KeyMap(prefix="flow.")


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = SPEECH_VOCAB_SIZE  # S3 speech-token codebook (3^8)
    input_size: int = 512  # token embedding width = encoder width
    n_feats: int = 80  # mel bins
    spk_embed_dim: int = 192  # CAMPPlus x-vector
    token_mel_ratio: int = 2  # 25 Hz tokens -> 50 Hz mel frames
    n_timesteps: int = 10  # Euler steps
    cfg_rate: float = 0.7  # inference classifier-free guidance weight w
    encoder: ConformerEncoderConfig = field(default_factory=ConformerEncoderConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


def cosine_t_span(n_timesteps: int) -> torch.Tensor:
    """(n+1,) fp32 CPU grid 1 - cos(s * pi/2), s = linspace(0, 1, n+1), computed as the reference does."""
    s = torch.linspace(0, 1, n_timesteps + 1, dtype=torch.float32)
    return 1 - torch.cos(s * 0.5 * torch.pi)


def solve_euler_cfg(
    estimator: ConditionalDecoder,
    noise: torch.Tensor,
    mu: torch.Tensor,
    spks: torch.Tensor,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    t_span: torch.Tensor,
    cfg_rate: float,
) -> torch.Tensor:
    """Euler integration of dx/dt = (1 + w) v(x | mu, spks, cond) - w v(x | 0, 0, 0) from t_span[0] to t_span[-1].

    Time-major tensors: noise, mu, cond (B, T, 80); spks (B, 80); mask (B, T, 1) 0/1 or None (all valid);
    t_span (n+1,) CPU fp32. Returns x (B, T, 80). Pure function of its arguments (no state kept anywhere), so a
    streaming caller can solve a window of frames with its own tensors.
    """
    b, t, f = noise.shape
    # Packed estimator input for the 2B rows: [x | mu | spks | cond]; uncond rows keep mu = spks = cond = 0.
    buf = noise.new_zeros(2 * b, t, 4 * f)  # (2B, T, 320)
    x = buf[:b, :, :f]  # the state lives in the cond rows' x slot, updated in place
    x.copy_(noise)
    buf[:b, :, f : 2 * f] = mu
    buf[:b, :, 2 * f : 3 * f] = spks.unsqueeze(1)
    buf[:b, :, 3 * f :] = cond
    mask2 = None if mask is None else torch.cat([mask, mask], dim=0)  # (2B, T, 1)
    attn_bias = estimator.attn_bias(mask2)  # built once per solve

    ts = t_span.to(dtype=torch.float32, device="cpu")
    dts = (ts[1:] - ts[:-1]).tolist()  # host floats: no device sync inside the loop
    t_emb = estimator.embed_time(ts[:-1].to(device=noise.device, dtype=noise.dtype))  # (n, 1024) for all steps
    for i, dt in enumerate(dts):
        buf[b:, :, :f] = x  # the uncond rows see the same x
        v = estimator.forward_packed(buf, t_emb[i].expand(2 * b, -1), mask2, attn_bias)  # (2B, T, 80)
        v_cond, v_uncond = v[:b], v[b:]
        v_cond.mul_(1.0 + cfg_rate).sub_(v_uncond, alpha=cfg_rate)  # (1 + w) v_c - w v_u
        x.add_(v_cond, alpha=dt)
    return x.clone()


class CausalCFM(nn.Module):
    """Holds the estimator (keys `decoder.estimator.*`) and runs the guided Euler solve."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.estimator = ConditionalDecoder(cfg)

    def forward(
        self,
        noise: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None,
        n_timesteps: int,
        cfg_rate: float,
    ) -> torch.Tensor:
        """Time-major (B, T, 80) in and out; see `solve_euler_cfg`."""
        return solve_euler_cfg(self.estimator, noise, mu, spks, cond, mask, cosine_t_span(n_timesteps), cfg_rate)


def _check_int_tokens(name: str, x: torch.Tensor, vocab: int, allow_empty: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N,) or (B, N), got {tuple(x.shape)}")
    if x.shape[1] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: at least one speech token is needed")
    if x.numel() and bool(((x < 0) | (x >= vocab)).any()):
        lo, hi = int(x.min()), int(x.max())
        raise ValueError(f"{name} holds ids outside [0, {vocab}) (min {lo}, max {hi}); drop special tokens first")
    return x.long()


def _check_float(name: str, x: torch.Tensor, shape_desc: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_desc}, got {tuple(x.shape)}")


class S3GenFlow(nn.Module):
    """Token-to-mel flow (`flow.*` keys of s3gen.safetensors). No buffers: safe to build on the meta device."""

    def __init__(self, cfg: FlowConfig = FlowConfig()) -> None:
        super().__init__()
        if cfg.input_size != cfg.encoder.d_model:
            raise ValueError(f"input_size {cfg.input_size} must equal the encoder width {cfg.encoder.d_model}")
        self.cfg = cfg
        self.input_embedding = embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.n_feats)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.d_model, cfg.n_feats)
        self.decoder = CausalCFM(cfg.estimator)

    # --- pieces (tensor-only, time-major) ------------------------------------------------------------------
    def encode(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """tokens (B, N) long in [0, vocab); lengths (B,) or None -> h (B, 2N, 512), mu (B, 2N, 80), mel lengths."""
        x = self.input_embedding(tokens)  # (B, N, 512)
        if lengths is not None:
            keep = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
            x = x * keep.unsqueeze(-1).to(x.dtype)
        h, h_lens = self.encoder(x, lengths)
        return h, self.encoder_proj(h), h_lens

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 192) x-vector -> (B, 80): affine projection of the L2-normalised vector."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    # --- public entry point --------------------------------------------------------------------------------
    def inference(
        self,
        speech_tokens: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        *,
        speech_token_lens: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        n_timesteps: int | None = None,
        cfg_rate: float | None = None,
    ) -> torch.Tensor:
        """Generate the mel of `speech_tokens` in the prompt's voice.

        speech_tokens (Ng,) or (B, Ng) int ids in [0, 6561); prompt_token (Np,) or (1|B, Np); prompt_feat
        (1|B, P, 80) prompt log-mel; embedding (192,) or (1|B, 192) x-vector; speech_token_lens (B,) for a
        right-padded batch (None: all rows full). Noise: `noise` (B, 80, 2(Np+Ng)) if given, else drawn with
        `generator` (or the global RNG, like the reference's randn_like). Returns mel (B, 80, 2(Np+Ng) - P).
        """
        cfg = self.cfg
        speech_tokens, prompt_token, embedding, speech_token_lens = self._validate(
            speech_tokens, prompt_token, prompt_feat, embedding, speech_token_lens, noise
        )
        w = self.encoder_proj.weight  # device / dtype of the model
        b = speech_tokens.shape[0]
        np_, p_frames = prompt_token.shape[1], prompt_feat.shape[1]
        t = cfg.token_mel_ratio * (np_ + speech_tokens.shape[1])

        tokens = torch.cat([prompt_token.expand(b, -1), speech_tokens], dim=1).to(w.device)  # (B, N)
        lens = None if speech_token_lens is None else (speech_token_lens + np_).to(w.device)
        _, mu, mel_lens = self.encode(tokens, lens)  # mu (B, T, 80)
        spks = self.speaker(embedding.to(w)).expand(b, -1)  # (B, 80)
        cond = mu.new_zeros(b, t, cfg.n_feats)
        cond[:, :p_frames] = prompt_feat.to(w)  # prompt mel in the first P frames
        mask = None
        if mel_lens is not None:
            mask = (torch.arange(t, device=w.device) < mel_lens[:, None]).unsqueeze(-1).to(w.dtype)  # (B, T, 1)
        if noise is None:
            noise = torch.randn((b, cfg.n_feats, t), generator=generator, device=w.device, dtype=w.dtype)
        mel = self.decoder(
            noise.to(w).transpose(1, 2),  # (B, T, 80)
            mu,
            spks,
            cond,
            mask,
            cfg.n_timesteps if n_timesteps is None else n_timesteps,
            cfg.cfg_rate if cfg_rate is None else cfg_rate,
        )  # (B, T, 80)
        return mel[:, p_frames:].transpose(1, 2).contiguous()  # (B, 80, T - P)

    def _validate(self, speech_tokens, prompt_token, prompt_feat, embedding, speech_token_lens, noise):
        """Type/shape/range checks with clear errors -> (speech_tokens, prompt_token, embedding, lens) normalised."""
        cfg = self.cfg
        speech_tokens = _check_int_tokens("speech_tokens", speech_tokens, cfg.vocab_size, allow_empty=False)
        prompt_token = _check_int_tokens("prompt_token", prompt_token, cfg.vocab_size, allow_empty=True)
        b, ng = speech_tokens.shape
        _check_float("prompt_feat", prompt_feat, f"(1 or B, P, {cfg.n_feats})", 3)
        if prompt_feat.shape[2] != cfg.n_feats:
            raise ValueError(f"prompt_feat must have {cfg.n_feats} mel bins last, got {tuple(prompt_feat.shape)}")
        if isinstance(embedding, torch.Tensor) and embedding.dim() == 1:
            embedding = embedding.unsqueeze(0)
        _check_float("embedding", embedding, f"(1 or B, {cfg.spk_embed_dim})", 2)
        if embedding.shape[1] != cfg.spk_embed_dim:
            raise ValueError(f"embedding must be (1 or B, {cfg.spk_embed_dim}), got {tuple(embedding.shape)}")
        for name, x in (("prompt_token", prompt_token), ("prompt_feat", prompt_feat), ("embedding", embedding)):
            if x.shape[0] not in (1, b):
                raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {b}")
        t = cfg.token_mel_ratio * (prompt_token.shape[1] + ng)
        if prompt_feat.shape[1] >= t:
            raise ValueError(
                f"prompt_feat has {prompt_feat.shape[1]} frames but prompt + generated tokens give only {t}: "
                "no frame would be left"
            )
        if noise is not None:
            _check_float("noise", noise, f"({b}, {cfg.n_feats}, {t})", 3)
            if tuple(noise.shape) != (b, cfg.n_feats, t):
                raise ValueError(f"noise must have shape {(b, cfg.n_feats, t)}, got {tuple(noise.shape)}")
        if speech_token_lens is not None:
            speech_token_lens = torch.as_tensor(speech_token_lens).long().reshape(-1)
            if speech_token_lens.shape[0] != b:
                raise ValueError(f"speech_token_lens must have {b} entries, got {speech_token_lens.shape[0]}")
            if bool(((speech_token_lens < 1) | (speech_token_lens > ng)).any()):
                raise ValueError(f"speech_token_lens must lie in [1, {ng}], got {speech_token_lens.tolist()}")
        return speech_tokens, prompt_token, embedding, speech_token_lens

