"""S3Gen flow encoder: the upsampling Conformer (spec §3.5).

Speech-token embeddings (B, N, 512) -> hidden states (B, 2N, 512) at the mel frame rate (50 Hz). Attribute names
mirror the checkpoint keys under `flow.encoder.` so the key map is the identity.

Structure: `embed` (Linear + LayerNorm(1e-5) + x sqrt(512)), `pre_lookahead_layer` (right-looking conv k4, then a
causal conv k3, residual), 6 Conformer blocks with ESPnet relative-position self-attention (Transformer-XL style,
`pos_bias_u/v`), a nearest x2 upsample + causal conv k5 (`up_layer`), `up_embed`, 4 more blocks, `after_norm`.
The Conformer blocks have no macaron FFN and no conv module; their LayerNorms use eps 1e-12.

Attention is full-context: only a key padding mask applies, and only when lengths are given. Like the reference,
the two convolutions (`pre_lookahead_layer`, `up_layer`) do not mask padded frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConformerEncoderConfig", "UpsampleConformerEncoder", "espnet_rel_pos_table", "rel_shift"]


@dataclass(frozen=True)
class ConformerEncoderConfig:
    d_model: int = 512  # input and attention width (the token embedding is 512-d too)
    n_heads: int = 8  # d_k = 64
    ffn_dim: int = 2048  # position-wise FFN hidden size (SiLU)
    n_blocks: int = 6  # Conformer blocks at the token rate
    n_up_blocks: int = 4  # Conformer blocks after the x2 upsample
    pre_lookahead_len: int = 3  # right context of `pre_lookahead_layer.conv1` (kernel = 3 + 1)
    up_stride: int = 2  # token -> mel frame ratio (nearest upsample; conv kernel = 2 * stride + 1)
    block_norm_eps: float = 1e-12  # norm_mha / norm_ff inside the Conformer blocks
    embed_norm_eps: float = 1e-5  # embed / up_embed / after_norm


def espnet_rel_pos_table(length: int, d_model: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """ESPnet "new" relative positional table for `length` frames: (1, 2*length - 1, d_model).

    Row k encodes the relative distance r = length - 1 - k (so +(length-1) ... -(length-1));
    PE(r)[2m] = sin(r w_m), PE(r)[2m+1] = cos(r w_m), w_m = 10000^(-2m/d). Computed in fp32 exactly as the
    reference does (positive part flipped, negative part from r = -1 on), then cast.
    """
    pos = torch.arange(0, length, dtype=torch.float32, device=device).unsqueeze(1)  # (L, 1)
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )  # (d/2,)
    pe_pos = torch.empty(length, d_model, dtype=torch.float32, device=device)
    pe_neg = torch.empty(length, d_model, dtype=torch.float32, device=device)
    pe_pos[:, 0::2] = torch.sin(pos * div)
    pe_pos[:, 1::2] = torch.cos(pos * div)
    pe_neg[:, 0::2] = torch.sin(-1 * pos * div)
    pe_neg[:, 1::2] = torch.cos(-1 * pos * div)
    table = torch.cat([torch.flip(pe_pos, [0]), pe_neg[1:]], dim=0)  # (2L-1, d)
    return table.unsqueeze(0).to(dtype)


def rel_shift(bd: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) scores against the relative table -> (B, H, T, T) with out[..., i, j] = bd[..., i, T-1-i+j].

    Column T-1-i+j of the table is the relative distance i - j (query index minus key index). Done as one
    strided view + copy (no padding / concatenation).
    """
    b, h, t, w = bd.shape
    bd = bd.contiguous()
    s_b, s_h, s_t, _ = bd.stride()
    return bd.as_strided((b, h, t, t), (s_b, s_h, s_t - 1, 1), bd.storage_offset() + t - 1)


class LinearEmbed(nn.Module):
    """`embed` / `up_embed`: Linear -> LayerNorm(1e-5) -> x sqrt(d). Keys: out.0 (Linear), out.1 (LayerNorm)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model, eps=eps))
        self.xscale = math.sqrt(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class PreLookaheadLayer(nn.Module):
    """Right-pad `lookahead` zeros -> Conv1d(k=lookahead+1) -> LeakyReLU(0.01) -> left-pad 2 -> Conv1d(k3) -> + x."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)  # (B, C, T)
        y = F.leaky_relu(self.conv1(F.pad(y, (0, self.lookahead))))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x  # (B, T, C)


class Upsample1D(nn.Module):
    """`up_layer`: nearest x stride along time -> left-pad 2*stride zeros -> Conv1d(k = 2*stride + 1)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2).repeat_interleave(self.stride, dim=2)  # (B, C, sT): nearest-neighbour upsample
        y = self.conv(F.pad(y, (2 * self.stride, 0)))
        return y.transpose(1, 2)  # (B, sT, C)


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet relative-position self-attention: softmax(((q+u) k^T + rel_shift((q+v) p^T)) / sqrt(d_k)) v."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.h = n_heads
        self.d_k = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_k))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D), pos_emb (1, 2T-1, D), key_bias (B, 1, 1, T) additive (-inf on padded keys) or None."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)  # (B, T, H, dk)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, H, T, dk)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, dk)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, dk)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scale = 1.0 / math.sqrt(self.d_k)
        bias = rel_shift(torch.matmul(q_v, p.transpose(-2, -1))) * scale  # (B, H, T, T)
        if key_bias is not None:
            bias = bias + key_bias
        y = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias, scale=scale)  # (B, H, T, dk)
        return self.linear_out(y.transpose(1, 2).reshape(b, t, self.h * self.d_k))


class PositionwiseFeedForward(nn.Module):
    """w_2(SiLU(w_1 x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm block without macaron FFN / conv module: x += MHA(LN(x)); x += FFN(LN(x))."""

    def __init__(self, cfg: ConformerEncoderConfig) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(cfg.d_model, cfg.n_heads)
        self.feed_forward = PositionwiseFeedForward(cfg.d_model, cfg.ffn_dim)
        self.norm_ff = nn.LayerNorm(cfg.d_model, eps=cfg.block_norm_eps)
        self.norm_mha = nn.LayerNorm(cfg.d_model, eps=cfg.block_norm_eps)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, key_bias)
        return x + self.feed_forward(self.norm_ff(x))


def _key_bias(lengths: torch.Tensor | None, t: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B,) valid lengths -> (B, 1, 1, T) additive mask, 0 on kept keys and -inf on padded ones (None: no mask)."""
    if lengths is None:
        return None
    keep = torch.arange(t, device=lengths.device) < lengths[:, None]  # (B, T)
    zero = torch.zeros((), dtype=dtype, device=lengths.device)
    return torch.where(keep, zero, float("-inf")).to(dtype)[:, None, None, :]


class UpsampleConformerEncoder(nn.Module):
    """(B, N, 512) token embeddings -> (B, 2N, 512). No buffers: safe to build on the meta device."""

    def __init__(self, cfg: ConformerEncoderConfig = ConformerEncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = LinearEmbed(d, cfg.embed_norm_eps)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerEncoderLayer(cfg) for _ in range(cfg.n_blocks))
        self.up_layer = Upsample1D(d, cfg.up_stride)
        self.up_embed = LinearEmbed(d, cfg.embed_norm_eps)
        self.up_encoders = nn.ModuleList(ConformerEncoderLayer(cfg) for _ in range(cfg.n_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=cfg.embed_norm_eps)

    def forward(
        self, xs: torch.Tensor, xs_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xs (B, N, D); xs_lens (B,) valid lengths or None (all frames valid).

        Returns (B, stride*N, D) and the upsampled lengths (None if `xs_lens` is None).
        """
        d = self.cfg.d_model
        t = xs.shape[1]
        x = self.embed(xs)
        pos = espnet_rel_pos_table(t, d, device=x.device, dtype=x.dtype)  # (1, 2N-1, D)
        key_bias = _key_bias(xs_lens, t, x.dtype)
        x = self.pre_lookahead_layer(x)
        for layer in self.encoders:
            x = layer(x, pos, key_bias)

        x = self.up_layer(x)  # (B, 2N, D)
        t = x.shape[1]
        lens = None if xs_lens is None else xs_lens * self.cfg.up_stride
        x = self.up_embed(x)
        pos = espnet_rel_pos_table(t, d, device=x.device, dtype=x.dtype)
        key_bias = _key_bias(lens, t, x.dtype)
        for layer in self.up_encoders:
            x = layer(x, pos, key_bias)
        return self.after_norm(x), lens
