"""T3 conditioning encoder: speaker projection, perceiver over the speech prompt, exaggeration (spec §2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import T3Config


class AttentionBlock(nn.Module):
    """Pre-LN attention `x1 + proj_out(attn(LN(x1), LN(x2)))`; one LayerNorm shared by both inputs."""

    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        B, T1, C = x1.shape
        T2 = x2.shape[1]
        n1, n2 = self.norm(x1), self.norm(x2)
        hd = C // self.n_heads
        q = self.to_q(n1).view(B, T1, self.n_heads, hd).transpose(1, 2)  # (B, nh, T1, hd)
        k = self.to_k(n2).view(B, T2, self.n_heads, hd).transpose(1, 2)
        v = self.to_v(n2).view(B, T2, self.n_heads, hd).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd), no mask
        h = h.transpose(1, 2).reshape(B, T1, C)
        return x1 + self.proj_out(h)


class Perceiver(nn.Module):
    """32 learned queries cross-attend to the prompt, then self-attend, with the SAME attention block."""

    def __init__(self, cfg: T3Config):
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.empty(1, cfg.perceiver_queries, cfg.dim))
        self.attn = AttentionBlock(cfg.dim, cfg.perceiver_heads, cfg.perceiver_norm_eps)

    def forward(self, h: Tensor) -> Tensor:  # (B, P, D) -> (B, 32, D)
        q = self.pre_attention_query.expand(h.shape[0], -1, -1)
        q = self.attn(q, h)
        return self.attn(q, q)


class T3CondEnc(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.cfg = cfg
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.dim)
        self.emotion_adv_fc = nn.Linear(1, cfg.dim, bias=False)
        self.perceiver = Perceiver(cfg)

    def forward(self, speaker_emb: Tensor, prompt_emb: Tensor, exaggeration: Tensor) -> Tensor:
        """speaker_emb (B, 256), prompt_emb (B, P, D) embedded prompt tokens, exaggeration (B,) -> (B, 34, D)."""
        spk = self.spkr_enc(speaker_emb.view(-1, self.cfg.speaker_embed_size))[:, None]  # (B, 1, D)
        prompt = self.perceiver(prompt_emb)  # (B, 32, D)
        emo = self.emotion_adv_fc(exaggeration.view(-1, 1, 1))  # (B, 1, D)
        return torch.cat((spk, prompt, emo), dim=1)
