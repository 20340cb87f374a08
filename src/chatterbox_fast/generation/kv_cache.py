"""Preallocated static KV cache: one index-put per step, never grown.

Stored as fp32 (exact), bf16, or int8 with one fp32 scale per (batch, head, position) row: each row quantised
symmetrically, round(x * 127 / max|x|) with scale max|x| / 127, exactly as the fused CPU step's C++ writer
(`chatterbox_fast::decode_layers`) does, so both paths hold bit-identical caches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) float -> (int8 (..., D), fp32 scales (...,)): per-row symmetric, an all-zero row gets scale 0."""
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), amax / 127.0


class KVCache(nn.Module):
    """`zero=False` leaves the slots uninitialised (no pass over the whole cache: on a CPU, only the pages of the
    slots a generation writes are ever touched): only for readers that never read a slot before writing it (the
    fused CPU decode step and the speculative decoder: decode.ensure_caches(..., zero=False)). Masked readers of a
    whole bucket (the module path's SDPA) need zeros: a masked-out slot's garbage could be NaN, and 0 x NaN is NaN."""

    def __init__(self, batch: int, n_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, zero: bool = True):
        super().__init__()
        shape = (batch, n_heads, max_seq, head_dim)
        self.zeroed = zero  # unwritten slots read as 0 (else: whatever the allocator returned)
        new = torch.zeros if zero else torch.empty
        # non-persistent: the cache is runtime state, never part of a checkpoint
        self.register_buffer("k_cache", new(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", new(shape, dtype=dtype, device=device), persistent=False)
        int8 = dtype == torch.int8  # then one fp32 scale per row; otherwise no scales (None buffers)
        self.register_buffer("k_scale", new(shape[:3], device=device) if int8 else None, persistent=False)
        self.register_buffer("v_scale", new(shape[:3], device=device) if int8 else None, persistent=False)

    @property
    def max_seq(self) -> int:
        return self.k_cache.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """input_pos (S,), k/v (B, H, S, D): write in place at those positions (rounded to the cache's dtype when
        it is narrower than k/v's, e.g. a bf16 cache under fp32 activations; quantised per row for int8). k/v of
        batch 1 go to every row (a prefix the rows share: decode.PrefixKV)."""
        B = self.k_cache.shape[0]
        if self.quantized:
            for cache, scale, x in ((self.k_cache, self.k_scale, k), (self.v_cache, self.v_scale, v)):
                q, s = quantize_rows_int8(x)
                cache.index_copy_(2, input_pos, q.expand(B, *q.shape[1:]))
                scale.index_copy_(2, input_pos, s.expand(B, *s.shape[1:]))
            return
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype).expand(B, *k.shape[1:]))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype).expand(B, *v.shape[1:]))

    def read(self, kv_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The first kv_len slots of k and v as `dtype` (B, H, kv_len, D): a view when the cache has that dtype,
        else a widened (int8: dequantised) copy."""
        k, v = self.k_cache[:, :, :kv_len], self.v_cache[:, :, :kv_len]
        if self.quantized:
            return (k.to(dtype) * self.k_scale[:, :, :kv_len, None].to(dtype),
                    v.to(dtype) * self.v_scale[:, :, :kv_len, None].to(dtype))
        return k.to(dtype), v.to(dtype)
