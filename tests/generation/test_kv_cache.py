"""The static KV cache (generation/kv_cache.py): fp32 / bf16 storage and the opt-in int8 one (per-row scales)."""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast import kernels
from chatterbox_fast.generation.kv_cache import KVCache, quantize_rows_int8

torch.set_grad_enabled(False)


def test_int8_cache_round_trip():
    """Written rows come back within half an int8 level of their own max (|x| / 254), all-zero rows stay zero
    (scale 0), untouched slots stay zero, and reads are dequantised to the asked dtype."""
    g = torch.Generator().manual_seed(0)
    c = KVCache(2, 3, 10, 64, torch.int8)
    assert c.quantized and c.k_cache.dtype == torch.int8 and c.k_scale.shape == (2, 3, 10)
    k, v = torch.randn(2, 3, 4, 64, generator=g) * 5, torch.randn(2, 3, 4, 64, generator=g)
    k[1, 2, 3] = 0
    pos = torch.tensor([2, 3, 4, 5])
    c.update(pos, k, v)
    rk, rv = c.read(6, torch.float32)
    assert rk.dtype == torch.float32 and rk.shape == (2, 3, 6, 64)
    for got, want in ((rk[:, :, 2:6], k), (rv[:, :, 2:6], v)):
        bound = want.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5) + 1e-12
        assert bool(((got - want).abs() <= bound).all())
    assert not rk[:, :, :2].any() and not rv[:, :, :2].any()
    assert c.k_scale[1, 2, 5] == 0 and not c.k_cache[1, 2, 5].any()
    assert c.k_cache.abs().max() == 127  # each row's largest value maps to +-127


def test_int8_quantiser_matches_the_cpu_kernels():
    """The module path's quantiser and the C++ one the fused step writes with are bit-identical."""
    if not kernels.load():
        pytest.skip("CPU kernels unavailable")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 3
    x[5] = 0
    q, s = quantize_rows_int8(x)
    q_ref, s_ref = torch.ops.chatterbox_fast.quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_caches_have_no_scales(dtype):
    c = KVCache(1, 2, 8, 16, dtype)
    assert not c.quantized and c.k_scale is None and "k_scale" not in dict(c.named_buffers())
    k = torch.randn(1, 2, 3, 16)
    c.update(torch.arange(3), k, k)
    rk, _ = c.read(3, torch.float32)
    torch.testing.assert_close(rk, k.to(dtype).float(), rtol=0, atol=0)


def test_engine_kv_cache_option(monkeypatch, tmp_path):
    import chatterbox_fast.engine as engine
    from chatterbox_fast.loading import Components

    from helpers import tiny_t3

    holder = {}

    def load(*a, **k):
        holder["t3"] = tiny_t3(0)
        return Components(t3=holder["t3"], s3gen=None, conditioner=None, tokenizer=None, conds=None)

    monkeypatch.setattr(engine, "load_components", load)
    monkeypatch.setattr(engine.OptimizedChatterboxTTS, "__init__", lambda self, parts, *a, **k: None)
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu")
    assert holder["t3"].kv_dtype is None  # exact: the weights' dtype (fp32)
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", kv_cache="int8")
    assert holder["t3"].kv_dtype == torch.int8
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", quantize="int8", kv_cache="fp32")
    assert holder["t3"].kv_dtype == torch.float32
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", kv_cache="bf16")
    assert holder["t3"].kv_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache must be None or one of"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", kv_cache="int4")
    with pytest.raises(ValueError, match="is a CPU mode"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="meta", kv_cache="int8")
