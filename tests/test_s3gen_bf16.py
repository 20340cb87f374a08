"""Opt-in bf16 flow estimator (`quantize.Bf16GemmLinear`, `quantize_s3gen(..., "bf16")`, `s3gen_quantize="bf16"`,
and what `use_mixed_precision=True` selects on a CPU with native bf16).

The mode changes the numbers by design. The tests check (a) the linear against its definition (a GEMM of the
bf16-rounded operands), (b) a transformer block against a float64 model of the scheme (the same bf16 roundings,
exact arithmetic elsewhere), which is much closer to it than the fp32 block is, (c) error bounds against fp32 that
a wrong implementation would break, and (d) that the engine selects the mode only where asked or where bf16 is
native.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast import quantize as qz
from chatterbox_fast.models.s3gen.estimator import BasicTransformerBlock
from chatterbox_fast.quantize import Bf16GemmLinear, quantize_s3gen

from helpers import estimator_case, tiny_estimator


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def _r(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16, back to float64."""
    return t.to(torch.bfloat16).double()


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_gemm_linear_definition(bias):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    lin = Bf16GemmLinear.from_weight(w, b if bias else None)
    assert lin.weight_t.shape == (40, 24) and lin.weight_t.dtype == torch.bfloat16 and lin.weight_t.is_contiguous()
    x = torch.randn(7, 40, generator=g)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (7, 24)
    want = _r(x) @ _r(w).t() + (_r(b) if bias else 0.0)  # exact product of the rounded operands, then one rounding
    assert (y.double() - want).abs().max() <= 2 ** -8 * want.abs().max() + 1e-6
    assert not torch.equal(y.float(), F.linear(x, w, b if bias else None))  # really bf16
    acc = torch.randn(7, 24, generator=g)
    base = acc.clone()
    assert lin.forward_acc_(acc, x) is acc and acc.dtype == torch.float32
    want_acc = base.double() + _r(_r(x) @ _r(w).t()) + (b.double() if bias else 0.0)
    assert (acc.double() - want_acc).abs().max() < 1e-5 + 2 ** -8 * want_acc.abs().max()
    acc2 = base.clone()
    lin.forward_acc_(acc2, x, bias=False)
    assert torch.allclose(acc2 + (b if bias else 0.0), acc, atol=1e-5)
    assert torch.equal(lin(x.to(torch.bfloat16)), y)  # bf16 input: the same rounding, no second one


def test_bf16_gemm_linear_rejects_bad_input():
    lin = Bf16GemmLinear.from_weight(torch.randn(8, 16), None)
    with pytest.raises(ValueError, match=r"\(M, 16\) float32 or bfloat16"):
        lin(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"\(M, 16\) float32 or bfloat16"):
        lin(torch.randn(4, 15))
    with pytest.raises(ValueError, match=r"\(M, 16\) float32 or bfloat16"):
        lin(torch.randn(4, 16, dtype=torch.float64))


def _block_model(blk: BasicTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """float64 model of BasicTransformerBlock._forward_bf16_: the bf16 roundings of the scheme (GEMM operands,
    GEMM / GELU outputs), exact arithmetic elsewhere; the attention is SDPA on the model's bf16 q / k / v."""
    a, ff = blk.attn1, blk.ff
    b, t, c = x.shape
    H, hd = a.heads, a.head_dim

    def ln(y, norm):
        return F.layer_norm(y, (c,), norm.weight.double(), norm.bias.double(), norm.eps)

    y = x.double()
    wqkv = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]).double()
    qkv = _r(_r(ln(y, blk.norm1)) @ _r(wqkv).t()).view(b, t, 3, H, hd)
    q, k, v = (qkv[:, :, i].to(torch.bfloat16) for i in range(3))  # (B, T, H, hd), exact: already bf16 values
    # the attention is the block's own (our AMX kernel, or SDPA's CPU flash kernel), on the model's q / k / v: it is
    # tested on its own below
    if hd == 64 and cpu_kernels.bf16_attention_ready():
        o = torch.ops.chatterbox_fast.full_attention_bf16(q, k, v, 1.0 / math.sqrt(hd)).double()
    else:
        o = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)), scale=1.0 / math.sqrt(hd))
        o = o.double().transpose(1, 2)
    o = o.reshape(b, t, H * hd)
    out = a.to_out[0]
    y = y + _r(_r(o) @ _r(out.weight.double()).t()) + out.bias.double()
    l1, l2 = ff.net[0].proj, ff.net[2]
    g = _r(_r(ln(y, blk.norm3)) @ _r(l1.weight.double()).t() + _r(l1.bias.double()))
    g = _r(F.gelu(g))
    return y + _r(g @ _r(l2.weight.double()).t()) + l2.bias.double()


@pytest.mark.parametrize("kernels", [True, False])
def test_bf16_block_matches_model_of_scheme(kernels, monkeypatch):
    cpu_kernels.load()
    if not kernels:  # PyTorch LayerNorm instead of our fused pass
        monkeypatch.setattr(cpu_kernels, "elementwise_ready", lambda: False)
    est = tiny_estimator(64)
    blk = next(m for m in est.modules() if isinstance(m, BasicTransformerBlock))
    x = torch.randn(2, 45, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_fp32 = blk.forward_(x.clone(), None)
        quantize_s3gen(est, "bf16")
        got = blk.forward_(x.clone(), None)
    model = _block_model(blk, x)
    err_model, err_fp32 = _rel_rms(got, model), _rel_rms(want_fp32, model)
    # the bf16 path is the scheme up to fp32-vs-fp64 inside the GEMMs (an occasional bf16 rounding flips one ulp)
    assert err_model < 3e-4 and err_model < 0.1 * _rel_rms(got, want_fp32), (err_model, err_fp32)  # 3e-5 vs 3e-3
    assert err_fp32 > 1e-3  # the scheme really is bf16: fp32 is far from its model


@pytest.mark.parametrize("head_dim", [16, 64])
def test_quantize_s3gen_bf16_estimator(head_dim):
    cpu_kernels.load()
    est, h, t_emb = estimator_case(head_dim)
    mask = torch.ones(2, 37, 1)
    mask[1, 30:] = 0
    with torch.no_grad():
        want = est.forward_packed(h.clone(), t_emb)
        want_m = est.forward_packed(h.clone(), t_emb, mask)
    released = []
    assert quantize_s3gen(est, "bf16", release=released.append) is est
    blocks = [m for m in est.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(set(b.bf16) == {"qkv", "out", "ff1", "ff2"} and b.int8 is None for b in blocks)
    assert len(released) == 6 * len(blocks)
    assert blocks[0].bf16["qkv"].weight_t.shape == (64, 3 * 2 * head_dim)
    with torch.no_grad():
        got = est.forward_packed(h.clone(), t_emb)
        got_m = est.forward_packed(h.clone(), t_emb, mask)  # padded batch: SDPA with the bias in bf16
    assert 1e-4 < _rel_rms(got, want) < 0.02
    assert 1e-4 < _rel_rms(got_m[0], want_m[0]) < 0.02
    assert 1e-4 < _rel_rms(got_m[1, :30], want_m[1, :30]) < 0.02
    assert torch.isfinite(got_m).all()
    with torch.enable_grad():  # autograd keeps the float weights: fp32
        assert _rel_rms(est.forward_packed(h.clone(), t_emb).detach(), want) < 1e-6
    first = blocks[0].bf16
    quantize_s3gen(est, "bf16")  # twice: a no-op
    assert blocks[0].bf16 is first
    quantize_s3gen(est, "int8")  # one low-precision form at a time
    assert blocks[0].bf16 is None and blocks[0].int8 is not None
    quantize_s3gen(est, "bf16")
    assert blocks[0].int8 is None and blocks[0].bf16 is not None
    with torch.no_grad():
        assert _rel_rms(est.forward_packed(h.clone(), t_emb), got) < 1e-6


def test_cpu_has_fast_bf16_env(monkeypatch):
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "0")
    assert qz.cpu_has_fast_bf16() is False
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "1")
    assert qz.cpu_has_fast_bf16() is True
    monkeypatch.delenv("CHATTERBOX_FAST_CPU_BF16")
    assert isinstance(qz.cpu_has_fast_bf16(), bool)


def _engine_with(monkeypatch, est):
    import chatterbox_fast.engine as engine
    from chatterbox_fast.loading import Components

    t3_modes = []
    monkeypatch.setattr(engine, "load_components",
                        lambda *a, **k: Components(t3=SimpleNamespace(), s3gen=est, conditioner=None,
                                                          tokenizer=None, conds=None))
    monkeypatch.setattr(engine.OptimizedChatterboxTTS, "__init__", lambda self, parts, *a, **k: None)
    monkeypatch.setattr(qz, "quantize_t3", lambda model, mode, release=None: t3_modes.append(mode))
    return engine, t3_modes


@pytest.mark.parametrize("native", [True, False])
def test_engine_mixed_precision_selects_bf16_flow_where_native(native, monkeypatch, tmp_path):
    est = tiny_estimator(16)
    engine, t3_modes = _engine_with(monkeypatch, est)
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "1" if native else "0")
    blocks = [b for b in est.modules() if isinstance(b, BasicTransformerBlock)]
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", use_mixed_precision=True)
    assert all((b.bf16 is not None) == native for b in blocks)
    assert t3_modes == (["bf16"] if cpu_kernels.available() else [])
    # an explicit s3gen_quantize wins over the mixed-precision default
    est2 = tiny_estimator(16)
    engine, _ = _engine_with(monkeypatch, est2)
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", use_mixed_precision=True, s3gen_quantize="int8")
    assert all(b.int8 is not None and b.bf16 is None
               for b in est2.modules() if isinstance(b, BasicTransformerBlock))


def test_engine_s3gen_quantize_bf16(monkeypatch, tmp_path):
    est = tiny_estimator(16)
    engine, t3_modes = _engine_with(monkeypatch, est)
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "1")
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", s3gen_quantize="bf16")
    assert all(b.bf16 is not None for b in est.modules() if isinstance(b, BasicTransformerBlock))
    assert t3_modes == []  # T3 untouched without use_mixed_precision
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "0")
    with pytest.warns(UserWarning, match="no native bf16"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", s3gen_quantize="bf16")
    with pytest.raises(ValueError, match="is a CPU mode"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="meta", s3gen_quantize="bf16")


# ---- chatterbox_fast::full_attention_bf16 (AMX tiles) -------------------------------------------------------------
def _amx():
    if not cpu_kernels.load():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.error()}")
    if not cpu_kernels.bf16_attention_ready():
        pytest.skip("no AMX-BF16 on this CPU (or a build without the AMX path)")


def _attention_model(q, k, v, scale):
    """float64 model of the kernel: exact scores and softmax, unnormalised probabilities rounded to bf16, P V exact,
    divided by the fp64 sum of the unrounded exponentials."""
    qd, kd, vd = (z.double().transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
    s = qd @ kd.transpose(-1, -2) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((_r(e) @ vd) / e.sum(-1, keepdim=True)).transpose(1, 2)  # (B, T, H, D)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 33, 100, 257])
def test_full_attention_bf16_matches_model(T):
    _amx()
    g = torch.Generator().manual_seed(T)
    qkv = (torch.randn(2, T, 3, 3, 64, generator=g) * 1.5).to(torch.bfloat16)  # strided views, as the estimator's
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = torch.ops.chatterbox_fast.full_attention_bf16(q, k, v, 0.125)
    assert y.shape == (2, T, 3, 64) and y.dtype == torch.bfloat16 and y.is_contiguous()
    want = _attention_model(q, k, v, 0.125)
    err = (y.double() - want).abs().max().item()
    # one bf16 rounding of the output (2^-9 relative) + fp32 sums and a 1e-7 exp polynomial inside
    assert err <= 2 ** -8 * want.abs().max().item() + 1e-6, err
    sdpa = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)), scale=0.125).transpose(1, 2)
    assert _rel_rms(y, sdpa) < 4e-3  # SDPA's bf16 CPU kernel computes the same scheme (its own order)
    # a wrong layout (e.g. keys and dims swapped, or a dropped tail) would be far off
    assert _rel_rms(y, _attention_model(q, k, v, 0.125)) < 3e-3


def test_full_attention_bf16_large_scores():
    _amx()
    g = torch.Generator().manual_seed(0)
    q, k, v = [(torch.randn(1, 40, 2, 64, generator=g) * 6).to(torch.bfloat16) for _ in range(3)]
    y = torch.ops.chatterbox_fast.full_attention_bf16(q, k, v, 1.0)  # scores ~ +-300: exp must not overflow
    assert torch.isfinite(y.float()).all()
    want = _attention_model(q, k, v, 1.0)
    assert (y.double() - want).abs().max().item() <= 2 ** -8 * want.abs().max().item() + 1e-6


def test_full_attention_bf16_rejects_bad_input():
    _amx()
    op = torch.ops.chatterbox_fast.full_attention_bf16
    x = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 CPU tensors"):
        op(x.float(), x.float(), x.float(), 1.0)
    with pytest.raises(RuntimeError, match="head size 64"):
        z = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)
        op(z, z, z, 1.0)
    with pytest.raises(RuntimeError, match="one shape"):
        op(x, x[:, :3], x, 1.0)


def test_bf16_estimator_amx_and_sdpa_agree(monkeypatch):
    _amx()
    est, h, t_emb = estimator_case(64, 70)
    with torch.no_grad():
        want = est.forward_packed(h.clone(), t_emb)
        quantize_s3gen(est, "bf16")
        amx = est.forward_packed(h.clone(), t_emb)
        monkeypatch.setattr(cpu_kernels, "bf16_attention_ready", lambda: False)
        sdpa = est.forward_packed(h.clone(), t_emb)
    assert not torch.equal(amx, sdpa)  # both paths really ran
    assert _rel_rms(amx, sdpa) < 0.6 * _rel_rms(amx, want)  # the same scheme (0.4x here), closer than to fp32
    assert 1e-4 < _rel_rms(amx, want) < 0.02
