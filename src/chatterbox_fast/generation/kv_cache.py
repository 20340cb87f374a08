"""Preallocated static KV cache: one index-put per step, never grown."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    def __init__(self, batch: int, n_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_heads, max_seq, head_dim)
        # non-persistent: the cache is runtime state, never part of a checkpoint
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """input_pos (S,), k/v (B, H, S, D): write in place at those positions (rounded to the cache's dtype when
        it is narrower than k/v's, e.g. a bf16 cache under fp32 activations)."""
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
