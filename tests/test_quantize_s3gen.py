"""Opt-in int8 GEMMs of S3Gen's CFM estimator (`quantize.W8A8Linear`, `quantize_s3gen`, `s3gen_quantize=`).

The mode changes the numbers by design, so these tests check (a) the quantisation arithmetic exactly against its
definition (C++ kernels and the PyTorch fallback), (b) error bounds that a wrong implementation would break, and
(c) that the path is really taken (the output differs from fp32) only where it should be.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast import quantize as qz
from chatterbox_fast.models.s3gen.estimator import BasicTransformerBlock
from chatterbox_fast.quantize import W8A8Linear, quantize_rows_int8, quantize_s3gen

from helpers import estimator_case, tiny_estimator


def _ref_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8), amax / 127.0


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)


def _kernels():
    if not cpu_kernels.load():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.error()}")


@pytest.mark.parametrize("k", [1, 7, 16, 33, 256, 1000])
def test_quantize_rows_kernel_matches_definition(k):
    _kernels()
    g = torch.Generator().manual_seed(k)
    big = torch.randn(13, k + 5, generator=g) * torch.rand(13, 1, generator=g) * 10
    big[4] = 0.0  # an all-zero row: scale 0, q 0
    x = big[:, 2:2 + k]  # rows with a stride: a view
    q, s = torch.ops.chatterbox_fast.quantize_rows(x)
    qr, sr = _ref_quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (13,)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)
    assert q.abs().max() <= 127 and (q[4] == 0).all() and s[4] == 0
    # reconstruction error of each element is at most half a step of its row
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


def test_quantize_rows_fallback_matches_kernel(no_kernels):
    x = torch.randn(9, 40)
    q, s = quantize_rows_int8(x)  # the PyTorch formula (kernels reported unavailable)
    qr, sr = _ref_quantize_rows(x)
    assert torch.equal(q, qr) and torch.allclose(s, sr, rtol=1e-7, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_dequant_rows_kernels(bias):
    _kernels()
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(1 << 20), 1 << 20, (11, 37), generator=g, dtype=torch.int32)
    sx, sw = torch.rand(11, generator=g), torch.rand(37, generator=g)
    b = torch.randn(37, generator=g) if bias else None
    want = acc.double() * sx.double()[:, None] * sw.double()[None, :] + (b.double() if bias else 0)
    got = torch.ops.chatterbox_fast.dequant_rows(acc, sx, sw, b)
    assert got.dtype == torch.float32 and got.shape == (11, 37)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    base = torch.randn(11, 50, generator=g)
    y = base.clone()[:, 5:42]  # rows with a stride
    torch.ops.chatterbox_fast.dequant_rows_acc_(y, acc, sx, sw, b)
    assert torch.allclose(y.double(), base[:, 5:42].double() + want, rtol=1e-6, atol=1e-5)


def test_int8_kernels_reject_bad_inputs():
    _kernels()
    ops = torch.ops.chatterbox_fast
    with pytest.raises(RuntimeError, match="quantize_rows: x must be"):
        ops.quantize_rows(torch.randn(4))
    with pytest.raises(RuntimeError, match="quantize_rows: x must be"):
        ops.quantize_rows(torch.randn(4, 4, dtype=torch.float64))
    acc = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="acc must be"):
        ops.dequant_rows(acc.float(), torch.ones(3), torch.ones(5), None)
    with pytest.raises(RuntimeError, match="sw must be"):
        ops.dequant_rows(acc, torch.ones(3), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.dequant_rows(acc, torch.ones(3), torch.ones(5), torch.ones(6))
    with pytest.raises(RuntimeError, match="y must be"):
        ops.dequant_rows_acc_(torch.zeros(3, 4), acc, torch.ones(3), torch.ones(5), None)


def _w8a8_case(seed=0, m=40, k=96, n=48):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.normal_(generator=g).mul_(0.1)
        lin.bias.normal_(generator=g)
    return lin, torch.randn(m, k, generator=g)


def _check_w8a8(lin, x):
    mod = W8A8Linear.from_weight(lin.weight, lin.bias)
    with torch.no_grad():
        want = lin(x)
        got = mod(x)
        # the module's arithmetic: the int8 operands' exact product, dequantised (its definition)
        q, sx = _ref_quantize_rows(x)
        exact = (q.double() @ mod.weight_int8.double().t()) * sx.double()[:, None] * mod.scale.double() + lin.bias
        y = torch.randn_like(want)
        y0 = y.clone()
        mod.forward_acc_(y, x)
    assert torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-5)
    assert torch.allclose(y.double(), y0.double() + exact, rtol=1e-6, atol=1e-5)
    # int8 drift vs fp32: small, but not zero (the int8 path really ran)
    err = _rel_rms(got, want)
    assert 1e-4 < err < 0.02, err
    return got


def test_w8a8_linear_kernels():
    _kernels()
    _check_w8a8(*_w8a8_case())


def test_w8a8_linear_fallback(no_kernels):
    lin, x = _w8a8_case(1)
    assert torch.isfinite(_check_w8a8(lin, x)).all()


def test_w8a8_rejects_bad_input():
    mod = W8A8Linear.from_weight(torch.randn(8, 16), None)
    with pytest.raises(ValueError, match=r"\(M, 16\) float32"):
        mod(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"\(M, 16\) float32"):
        mod(torch.randn(4, 15))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: our CPU attention kernel's head size (when built)
def test_quantize_s3gen_estimator(head_dim, kernels, monkeypatch):
    cpu_kernels.load()
    if not kernels:  # the PyTorch fallbacks of the quantise / dequantise passes
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    est, h, t_emb = estimator_case(head_dim)
    with torch.no_grad():
        want = est.forward_packed(h.clone(), t_emb)
    released = []
    assert quantize_s3gen(est, "int8", release=released.append) is est
    blocks = [m for m in est.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(set(b.int8) == {"qkv", "out", "ff1", "ff2"} for b in blocks)
    assert len(released) == 6 * len(blocks)  # q, k, v, out, ff1, ff2 weights
    inner = 2 * head_dim
    assert blocks[0].int8["qkv"].weight_int8.shape == (3 * inner, 64)
    with torch.no_grad():
        got = est.forward_packed(h.clone(), t_emb)
        # masked (padded batch) path: SDPA on the int8 q/k/v views
        mask = torch.ones(2, 37, 1)
        mask[1, 30:] = 0
        got_m = est.forward_packed(h.clone(), t_emb, mask)
        want_m = qz_off(est, lambda: est.forward_packed(h.clone(), t_emb, mask))
    err = _rel_rms(got, want)
    assert 1e-4 < err < 0.05, err
    assert 1e-4 < _rel_rms(got_m[0], want_m[0]) < 0.05
    # autograd (the non-in-place forward) keeps the float weights: fp32 up to summation order
    with torch.enable_grad():
        assert _rel_rms(est.forward_packed(h.clone(), t_emb).detach(), want) < 1e-6
    # converting twice is a no-op
    first = blocks[0].int8
    quantize_s3gen(est, "int8")
    assert blocks[0].int8 is first


def qz_off(est, fn):
    """fn() with the int8 linears of `est` switched off (the float path)."""
    blocks = [m for m in est.modules() if isinstance(m, BasicTransformerBlock)]
    saved = [b.int8 for b in blocks]
    for b in blocks:
        b.int8 = None
    try:
        with torch.no_grad():
            return fn()
    finally:
        for b, s in zip(blocks, saved):
            b.int8 = s


def test_quantize_s3gen_bad_args():
    with pytest.raises(ValueError, match="s3gen_quantize must be None or one of"):
        qz.check_s3gen_quantize_mode("int4")
    with pytest.raises(TypeError, match="no estimator transformer blocks"):
        quantize_s3gen(torch.nn.Linear(2, 2), "int8")
    with pytest.raises(ValueError, match="needs a mode"):
        quantize_s3gen(tiny_estimator(16), None)


def test_engine_s3gen_quantize_option(monkeypatch, tmp_path):
    import chatterbox_fast.engine as engine
    from chatterbox_fast.loading import Components

    est = tiny_estimator(16)
    monkeypatch.setattr(engine, "load_components",
                        lambda *a, **k: Components(t3=None, s3gen=est, conditioner=None, tokenizer=None, conds=None))
    monkeypatch.setattr(engine.OptimizedChatterboxTTS, "__init__", lambda self, parts, *a, **k: None)
    engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", s3gen_quantize="int8")
    assert all(b.int8 is not None for b in est.modules() if isinstance(b, BasicTransformerBlock))
    conv = est.down_blocks[0][2]  # the engine's inference layout: tap-major convs
    assert all(conv.weight[:, :, j].is_contiguous() for j in range(3))
    if cpu_kernels.int8_attention_ready():
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", s3gen_quantize="int8-attn")
        assert all(b.int8_attention for b in est.modules() if isinstance(b, BasicTransformerBlock))
    else:
        with pytest.raises(ValueError, match="AVX512-VNNI"):
            engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", s3gen_quantize="int8-attn")
    with pytest.raises(ValueError, match="s3gen_quantize must be None"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", s3gen_quantize="fp8")
    with pytest.raises(ValueError, match="is a CPU mode"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="meta", s3gen_quantize="int8")


# ---- "int8-attn": attention on int8 dot products (chatterbox_fast::full_attention_int8) -------------------------
_EXP2_C = (1.5403530393381606e-4, 1.3333558146428443e-3, 9.6181291076284772e-3, 5.5504108664821580e-2,
           2.4022650695910071e-1, 6.9314718055994531e-1, 1.0)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add: exact in float64, one rounding to fp32."""
    return _f32(a.double() * b.double() + c.double())


def _exp2_poly(x: torch.Tensor) -> torch.Tensor:
    """The kernels' 2^x (x <= 0): clamp, round to nearest, degree-6 FMA chain, exact power-of-two scaling."""
    x = x.clamp(min=-150.0)
    n = torch.round(x)
    f = x - n
    p = torch.full_like(x, _EXP2_C[0])
    for c in _EXP2_C[1:]:
        p = _fma(p, f, torch.full_like(x, c))
    return torch.ldexp(p, n)


def _seq_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim -2 summed in sequence order in fp32, as the kernel does: (..., T, D) -> (..., 1, D)."""
    acc = torch.zeros_like(x[..., :1, :])
    for t in range(x.shape[-2]):
        acc = acc + x[..., t:t + 1, :]
    return acc / x.shape[-2]


def _ref_int8_attention(q, k, v, scale):
    """PyTorch statement of the op, to the rounding: keys and values centred over T, per-key / per-query / per-value-
    channel int8, exact integer scores, base-2 softmax rounded to u8 levels (their integer sum normalises), exact
    integer P V. q, k, v (B, T, H, D) -> (B, T, H, D)."""
    qs = q.permute(0, 2, 1, 3).float() * torch.tensor(scale * 1.4426950408889634, dtype=torch.float32)
    kk, vv = k.permute(0, 2, 1, 3).float(), v.permute(0, 2, 1, 3).float()  # (B, H, T, D)
    b, h, t, d = qs.shape
    q8, sq = _ref_quantize_rows(qs.reshape(-1, d))
    k8, sk = _ref_quantize_rows((kk - _seq_mean(kk)).reshape(-1, d))
    q8, k8 = q8.view(b, h, t, d).double(), k8.view(b, h, t, d).double()
    s = _f32(q8 @ k8.transpose(-1, -2)) * sk.view(b, h, 1, t) * sq.view(b, h, t, 1)
    p8 = torch.round(_exp2_poly(s - s.amax(dim=-1, keepdim=True)) * 255.0)
    linv = 1.0 / p8.sum(dim=-1, keepdim=True)  # (B, H, T, 1), exact integer sums
    vm = _seq_mean(vv)
    vc = vv - vm
    amax = vc.abs().amax(dim=-2, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    v8 = torch.round(vc * inv).clamp(-127, 127)
    acc = _f32(p8.double() @ v8.double())
    o = _fma(acc * (amax / 127.0), linv.expand_as(acc), vm.expand_as(acc))
    return o.permute(0, 2, 1, 3)


def _qkv(t: int, heads: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, 3, heads, d, generator=g)
    x[:, :, 1:] += 3.0 * torch.randn(2, heads, d, generator=g)  # common key and value offsets: centred away
    return x[:, :, 0], x[:, :, 1], x[:, :, 2]  # strided (B, T, H, D) views, as the estimator passes them


@pytest.mark.parametrize("t", [1, 31, 33, 77])
@pytest.mark.parametrize("d", [16, 64])
def test_int8_attention_matches_its_definition(t, d):
    if not cpu_kernels.load():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.error()}")
    q, k, v = _qkv(t, 2, d)
    want = _ref_int8_attention(q, k, v, d ** -0.5)
    exact = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v))).transpose(1, 2)
    paths = [True] + ([False] if d == 64 and cpu_kernels.int8_attention_ready() else [])
    outs = [torch.ops.chatterbox_fast.full_attention_int8(q, k, v, d ** -0.5, portable) for portable in paths]
    for y in outs:
        assert y.shape == q.shape and y.is_contiguous()
        torch.testing.assert_close(y, want, rtol=0, atol=1e-6)  # the same roundings: equal to ~1 ulp
        if t > 1:  # the int8 attention really changes the output, within a few per cent
            assert 1e-4 < _rel_rms(y, exact) < 0.03
    if len(outs) == 2:  # the VNNI tiles and the portable loop: the same integer sums, exp2 and epilogues
        assert torch.equal(outs[0], outs[1])


def test_int8_attention_bad_input():
    if not cpu_kernels.load():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.error()}")
    q, k, v = _qkv(8, 2, 64)
    with pytest.raises(RuntimeError, match="full_attention_int8: q, k and v must be"):
        torch.ops.chatterbox_fast.full_attention_int8(q.double(), k, v, 0.125)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.chatterbox_fast.full_attention_int8(q, k[:, :4], v, 0.125)
    with pytest.raises(RuntimeError, match="head size"):
        big = torch.randn(1, 2, 1, 2048)
        torch.ops.chatterbox_fast.full_attention_int8(big, big, big, 0.1)
    with pytest.raises(RuntimeError, match="65536 keys"):
        long = torch.empty(1, 65537, 1, 64)  # rejected before anything is read
        torch.ops.chatterbox_fast.full_attention_int8(long, long, long, 0.1)


def test_quantize_s3gen_int8_attn_mode(monkeypatch):
    if not (cpu_kernels.load() and cpu_kernels.int8_attention_ready()):
        with pytest.raises(ValueError, match="AVX512-VNNI"):
            quantize_s3gen(tiny_estimator(64), "int8-attn")
        return
    est, h, t_emb = estimator_case(64)
    with torch.no_grad():
        exact = est.forward_packed(h.clone(), t_emb)
        quantize_s3gen(est, "int8")
        gemms = est.forward_packed(h.clone(), t_emb)
        quantize_s3gen(est, "int8-attn")  # same int8 linears, int8 scores on top
        blocks = [m for m in est.modules() if isinstance(m, BasicTransformerBlock)]
        assert all(b.int8_attention for b in blocks)
        both = est.forward_packed(h.clone(), t_emb)
        quantize_s3gen(est, "int8")  # and back: the int8-GEMM output again, exactly
        assert torch.equal(est.forward_packed(h.clone(), t_emb), gemms)
    assert 1e-5 < _rel_rms(both, gemms) < 0.05  # the scores path is really taken
    assert _rel_rms(both, exact) < 0.08
    # no kernel: a clear error instead of a slow portable loop
    monkeypatch.setattr(cpu_kernels, "int8_attention_ready", lambda: False)
    with pytest.raises(ValueError, match="s3gen_quantize='int8-attn' needs a CPU with AVX512-VNNI"):
        quantize_s3gen(tiny_estimator(64), "int8-attn")
