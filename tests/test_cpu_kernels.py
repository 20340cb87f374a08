"""Our C++ CPU kernels (src/chatterbox_fast/kernels): build, parity with an fp64 reference, errors, compile.

Tolerance: both kernels accumulate in fp32 over unrounded fp32 activations, so the only difference from the exact
(fp64) product of x and the stored weight is fp32 summation order: |err| <= 1e-6 * sum_k |x_k| |w_k| (K <= ~1000
terms: ~K * 2^-24 worst case, far less in practice) + 1e-7.

The build for this machine's ISA must succeed here (CI has a compiler: torch.compile's CPU backend needs one too),
so a broken kernel source fails the suite instead of silently testing the fallback. The other ISAs' builds (AVX2,
portable scalar) are checked in subprocesses, since one process can load one build of the op library.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from chatterbox_fast import kernels

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def ops():
    if os.environ.get("CHATTERBOX_FAST_CPU_KERNELS", "1") == "0":
        pytest.skip("disabled by CHATTERBOX_FAST_CPU_KERNELS=0")
    assert kernels.load(), kernels.error()
    return torch.ops.chatterbox_fast


def _ref(x, w, scale=None):
    w64 = w.double() if scale is None else w.double() * scale.double()[:, None]
    ref = x.double() @ w64.T
    tol = 1e-6 * (x.double().abs() @ w64.abs().T) + 1e-7
    return ref, tol


SHAPES = [(1, 1, 1), (2, 8, 16), (2, 9, 17), (3, 7, 15), (5, 33, 64), (2, 1000, 1030), (64, 24, 100), (2, 0, 16),
          (0, 8, 16), (2, 8, 0)]


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_int8_linear_matches_fp64(ops, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.01
    y = ops.int8_linear(x, w, scale)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref, tol = _ref(x, w, scale)
    assert bool(((y.double() - ref).abs() <= tol).all()), (y.double() - ref).abs().max()


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_bf16_linear_matches_fp64(ops, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k + 1)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).bfloat16()
    y = ops.bf16_linear(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref, tol = _ref(x, w)
    assert bool(((y.double() - ref).abs() <= tol).all()), (y.double() - ref).abs().max()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos, kv_len", [(0, 128), (5, 128), (127, 128), (128, 256), (300, 384), (999, 1024)])
def test_decode_attention_matches_masked_sdpa(ops, pos, kv_len, cache_dtype):
    """T3's decode attention: one query per (batch, head) over cache slots <= pos, as SDPA with the step's mask.
    A bf16 cache: the same as SDPA over the cache's values widened to fp32 (the kernel's math is fp32 either way)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(pos)
    kc, vc = torch.randn(2, 16, 1024, 64, generator=g), torch.randn(2, 16, 1024, 64, generator=g)
    q = torch.randn(2, 1, 16, 64, generator=g).transpose(1, 2)  # (B, H, 1, D), strided as in T3
    ip = torch.tensor([pos])
    mask = torch.arange(kv_len)[None, :] <= ip[:, None]
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    want = F.scaled_dot_product_attention(q, kc[:, :, :kv_len].float(), vc[:, :, :kv_len].float(), attn_mask=mask)
    got = ops.decode_attention(q, kc, vc, ip, 0.125)
    assert got.shape == (2, 16, 1, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    kc[:, :, pos + 1:] = float("nan")  # slots past the position are never read
    assert torch.isfinite(ops.decode_attention(q, kc, vc, ip, 0.125)).all()


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
def test_t3_decode_with_and_without_our_attention(ops, monkeypatch, kv_dtype):
    """T3's decode step through our attention (CPU default once loaded) vs ATen's masked SDPA: same logits to fp32
    noise, same sampled tokens; also with a bf16 KV cache (the CPU low-precision modes: ATen's path widens it)."""
    from helpers import tiny_t3

    if not kernels.decode_attention_ready():
        pytest.skip(f"T3 uses our decode attention on AVX-512 builds only (this build: {kernels.isa()})")
    from chatterbox_fast.generation.decode import generate_tokens
    from chatterbox_fast.generation.sampling import SamplingParams

    model = tiny_t3(0)
    model.kv_dtype = kv_dtype
    x = torch.randn(2, 12, model.cfg.dim, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_new_tokens=40, min_p=0.0)
    calls = {"n": 0}
    real = torch.ops.chatterbox_fast.decode_attention

    def counting(*a):
        calls["n"] += 1
        return real(*a)

    def run():
        with torch.inference_mode():
            return generate_tokens(model, x.clone(), params, generator=torch.Generator().manual_seed(3))

    import chatterbox_fast.models.t3 as t3_mod

    monkeypatch.setattr(t3_mod.torch.ops.chatterbox_fast, "decode_attention", counting, raising=False)
    ours = run()
    assert calls["n"] > 0, "the decode step did not use our attention"
    assert model.tfmr.layers[0].self_attn.kv_cache.k_cache.dtype == (kv_dtype or torch.float32)
    monkeypatch.setattr(kernels, "decode_attention_ready", lambda: False)
    calls["n"] = 0
    aten = run()
    assert calls["n"] == 0
    assert torch.equal(ours, aten)


def int16_activation_reference(x, w, s):
    """int8_linear_packed's AVX-512 math in fp64: each row of x rounded to int16 with the scale max|x| / 32767, exact
    integer products with the int8 weight, times both scales."""
    m = x.abs().amax(1, keepdim=True)
    sx = torch.where(m > 0, m / 32767, torch.ones_like(m))
    q = (x * (1 / sx)).round().clamp(-32767, 32767)
    return (q.double() @ w.double().t()) * sx.double() * s.double()


@pytest.mark.parametrize("m,n,k", [(2, 8, 64), (2, 48, 1024), (3, 16, 128), (1, 8, 256), (64, 24, 192),
                                   (12, 16, 1024)])
def test_int8_linear_packed_equals_row_major(ops, m, n, k):
    """The packed layout (quantize.pack_weight): bf16 weights give bit-identical results (same products, same
    summation order). int8 weights: in AVX-512 builds the int16-activation scheme, equal to its fp64 model to fp32
    rounding (~1e-7 of the largest output; the fp32-math kernel differs from that model by 1.5-5e-5, so this fails
    if the scheme changes) and within 1e-4 of the fp32 math; elsewhere bit-identical to the row-major kernel."""
    from chatterbox_fast.quantize import pack_weight, unpack_weight

    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g)
    p = pack_weight(w)
    assert p.shape == (n // 8, k // 64, 8, 64) and torch.equal(unpack_weight(p), w)
    got, fp32 = ops.int8_linear_packed(x, p, s), ops.int8_linear(x, w, s)
    if kernels.int8_packed_int16_activations():
        ref = int16_activation_reference(x, w, s)
        top = ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 1e-6 * top
        assert (fp32.double() - ref).abs().max().item() > 1e-6 * top  # the two schemes are told apart
        assert (got - fp32).abs().max().item() <= 1e-4 * top
    else:
        assert torch.equal(got, fp32)
    wb = torch.randn(n, k, generator=g).bfloat16()
    pb = pack_weight(wb)
    assert pb.shape == (n // 8, k // 32, 8, 32) and torch.equal(unpack_weight(pb), wb)
    got_b = ops.bf16_linear_packed(x, pb)
    assert torch.equal(got_b, ops.bf16_linear(x, wb))
    if m > 2:  # the multi-row kernel (each weight line read once for all rows) computes each row as the pair path
        for r in range(0, m - 1, 2):
            assert torch.equal(got_b[r:r + 2], ops.bf16_linear_packed(x[r:r + 2].contiguous(), pb))


def test_int8_linear_packed_without_vnni_is_bit_identical(ops, tmp_path):
    """The int16 path's vpmaddwd + vpaddd form (AVX-512 CPUs without VNNI), forced in a subprocess by
    CHATTERBOX_FAST_CPU_VNNI=0, gives the same exact integer sums as vpdpwssd: bit-identical outputs."""
    if not kernels.int8_packed_int16_activations():
        pytest.skip("the int16-activation kernel is built for AVX-512 only")
    import ctypes

    if ctypes.CDLL(kernels._build(kernels.isa()).as_posix()).cbf_int8_linear_path() != 2:
        pytest.skip("this CPU has no AVX512-VNNI: both forms would be vpmaddwd")
    code = """
        import ctypes, sys, torch
        from chatterbox_fast import kernels
        from chatterbox_fast.quantize import pack_weight
        assert kernels.load(), kernels.error()
        lib = ctypes.CDLL(kernels._build(kernels.isa()).as_posix())
        assert lib.cbf_int8_linear_path() == 1  # vpmaddwd + vpaddd
        g = torch.Generator().manual_seed(3)
        out = []
        for m, n, k in [(2, 8, 64), (3, 40, 1024), (2, 64, 4096), (5, 24, 192)]:
            x = torch.randn(m, k, generator=g)
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            s = torch.rand(n, generator=g)
            out.append((x, w, s, torch.ops.chatterbox_fast.int8_linear_packed(x, pack_weight(w), s)))
        torch.save(out, sys.argv[1])
    """
    path = tmp_path / "novnni.pt"
    env = dict(os.environ, CHATTERBOX_FAST_CPU_VNNI="0")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(path)], env=env, timeout=300,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from chatterbox_fast.quantize import pack_weight

    for x, w, s, y in torch.load(path):
        assert torch.equal(ops.int8_linear_packed(x, pack_weight(w), s), y)


def test_int8_linear_packed_edge_rows(ops):
    """All-zero rows give zeros, a row with a NaN or an infinity gives NaN (and leaves the other rows alone), and K
    above 8192 (where int16 sums could overflow int32) takes the fp32-math kernel: bit-identical to int8_linear."""
    from chatterbox_fast.quantize import pack_weight

    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (16, 128), generator=g, dtype=torch.int8)
    s = torch.rand(16, generator=g)
    x = torch.randn(3, 128, generator=g)
    x[1] = 0.0
    x[2, 7] = float("inf")
    y = ops.int8_linear_packed(x, pack_weight(w), s)
    assert torch.isfinite(y[0]).all() and torch.equal(y[1], torch.zeros(16))
    assert not torch.isfinite(y[2]).any()
    x[2, 7] = float("nan")
    assert ops.int8_linear_packed(x, pack_weight(w), s)[2].isnan().all()
    big = torch.randint(-127, 128, (8, 8256), generator=g, dtype=torch.int8)
    xb = torch.randn(2, 8256, generator=g)
    assert torch.equal(ops.int8_linear_packed(xb, pack_weight(big), s[:8]), ops.int8_linear(xb, big, s[:8]))


@pytest.mark.parametrize("n,streams", [(1, 1), (100, 3), (4096, 4), (100003, 8), (64 * 1024 + 17, 16)])
def test_read_probe_sums_every_element_once(ops, n, streams):
    """The bandwidth probe's streams and tails cover x exactly once (distinct values: a skipped or doubled element
    changes the sum)."""
    x = torch.arange(n, dtype=torch.float32)
    got = ops.read_probe(x, streams)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(n * (n - 1) / 2, rel=1e-6)
    with pytest.raises(RuntimeError, match="streams"):
        ops.read_probe(x, 0)
    with pytest.raises(RuntimeError, match="1-D float32"):
        ops.read_probe(x.view(1, -1), 2)


def test_int8_linear_packed_bad_inputs(ops):
    from chatterbox_fast.quantize import pack_weight

    w = pack_weight(torch.zeros(16, 128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="K = 64"):
        ops.int8_linear_packed(torch.zeros(2, 64), w, torch.ones(16))
    with pytest.raises(RuntimeError, match="scale must be"):
        ops.int8_linear_packed(torch.zeros(2, 128), w, torch.ones(8))
    with pytest.raises(RuntimeError, match="w must be"):
        ops.int8_linear_packed(torch.zeros(2, 128), torch.zeros(16, 128, dtype=torch.int8), torch.ones(16))
    with pytest.raises(ValueError, match="N % 8"):
        pack_weight(torch.zeros(12, 128, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8 or bfloat16"):
        pack_weight(torch.zeros(16, 128))
    with pytest.raises(RuntimeError, match="bf16_linear_packed: w must be"):
        ops.bf16_linear_packed(torch.zeros(2, 64), pack_weight(torch.zeros(16, 128, dtype=torch.bfloat16)))


def test_decode_attention_bad_inputs(ops):
    kc = torch.zeros(2, 16, 64, 64)
    q = torch.zeros(2, 16, 1, 64)
    with pytest.raises(RuntimeError, match="outside the 64-slot cache"):
        ops.decode_attention(q, kc, kc, torch.tensor([64]), 0.125)
    with pytest.raises(RuntimeError, match="input_pos must be"):
        ops.decode_attention(q, kc, kc, torch.tensor([1, 2]), 0.125)
    with pytest.raises(RuntimeError, match="caches must be contiguous"):
        ops.decode_attention(q, kc[:, :8], kc, torch.tensor([1]), 0.125)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        ops.decode_attention(q, kc, kc.bfloat16(), torch.tensor([1]), 0.125)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        ops.decode_attention(q, kc.half(), kc.half(), torch.tensor([1]), 0.125)


def _attention_fp64(q, k, v, scale):
    """softmax(q k^T * scale) v in fp64 for (B, T, H, D) inputs -> (B, T, H, D)."""
    import torch.nn.functional as F

    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q64, k64, v64, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("t", [1, 5, 31, 32, 33, 47, 48, 49, 77, 300])
@pytest.mark.parametrize("d", [64, 32])
def test_full_attention_matches_fp64(ops, t, d):
    """S3Gen estimator attention on (B, T, H, D) views of the q/k/v linears' outputs (row stride H*D; k and v from
    one fused buffer: a different stride), every tail of the 48-query blocks, 32-key panels and 16-lane vectors.
    Observed max error ~1e-6 (fp32 sums over T keys); bound 5e-6 at |y| <~ 3."""
    g = torch.Generator().manual_seed(t * 100 + d)
    q = torch.randn(2, t, 8 * d, generator=g).view(2, t, 8, d)
    kv = torch.randn(2, t, 2 * 8 * d, generator=g)
    k, v = kv[..., : 8 * d].view(2, t, 8, d), kv[..., 8 * d:].view(2, t, 8, d)
    got = ops.full_attention(q, k, v, d ** -0.5)
    assert got.shape == (2, t, 8, d) and got.is_contiguous()
    torch.testing.assert_close(got.double(), _attention_fp64(q, k, v, d ** -0.5), rtol=0, atol=5e-6)


def test_full_attention_peaked_and_flat_softmax(ops):
    """Large logits (|s| ~ 300: near one-hot rows, the max subtraction must be exact; fp32 logits then carry ~1e-5
    absolute error, so the bound is relative to fp32 SDPA's own error) and all-equal logits (uniform rows)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 100, 2, 64, generator=g) * 40
    k, v = torch.randn(1, 100, 2, 64, generator=g), torch.randn(1, 100, 2, 64, generator=g)
    got = ops.full_attention(q, k, v, 0.125)
    assert torch.isfinite(got).all()
    exact = _attention_fp64(q, k, v, 0.125)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.125).transpose(1, 2)
    err, err_sdpa = (got.double() - exact).abs().max().item(), (sdpa.double() - exact).abs().max().item()
    assert err <= max(3 * err_sdpa, 5e-6), (err, err_sdpa)
    flat = ops.full_attention(torch.zeros(1, 50, 1, 64), k[:, :50, :1], v[:, :50, :1], 0.125)
    torch.testing.assert_close(flat, v[:, :50, :1].mean(1, keepdim=True).expand_as(flat), rtol=0, atol=1e-6)


def test_full_attention_bad_inputs(ops):
    x = torch.zeros(1, 8, 2, 64)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.full_attention(x, x[:, :4], x[:, :4], 0.125)
    with pytest.raises(RuntimeError, match="float32 CPU tensors with a contiguous last dim"):
        ops.full_attention(x.double(), x.double(), x.double(), 0.125)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        y = torch.zeros(1, 8, 64, 2).transpose(2, 3)
        ops.full_attention(y, y, y, 0.125)
    with pytest.raises(RuntimeError, match="empty sequence"):
        e = torch.zeros(1, 0, 2, 64)
        ops.full_attention(e, e, e, 0.125)


def _tiny_estimator(n_blocks: int):
    """A small random CFM estimator and one input (x, mask slot, mu, t, spks, cond) for it."""
    from chatterbox_fast.models.s3gen import estimator as est_mod

    torch.manual_seed(0)
    cfg = est_mod.EstimatorConfig(channels=64, num_mid_blocks=2, n_blocks=n_blocks, num_heads=2, head_dim=64,
                                  time_embed_dim=128)
    model = est_mod.ConditionalDecoder(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    x, mu, cond = (torch.randn(2, 80, 70, generator=g) for _ in range(3))
    spks, t = torch.randn(2, 80, generator=g), torch.rand(2, generator=g)
    return model, (x, mu, t, spks, cond)


def _count_calls(monkeypatch, module, name: str, calls: dict) -> None:
    """Replace torch.ops.chatterbox_fast.<name> as `module` sees it by a wrapper counting into calls[name]."""
    real = getattr(torch.ops.chatterbox_fast, name)

    def counting(*a):
        calls[name] += 1
        return real(*a)

    monkeypatch.setattr(module.torch.ops.chatterbox_fast, name, counting, raising=False)


def test_estimator_with_and_without_our_attention(ops, monkeypatch):
    """S3Gen's CFM estimator through our attention (the CPU default once loaded) vs ATen's SDPA, same weights and
    inputs: the op is called once per transformer block and the velocities agree to fp32 noise."""
    from chatterbox_fast.models.s3gen import estimator as est_mod

    model, (x, mu, t, spks, cond) = _tiny_estimator(1)
    calls = {"full_attention": 0}
    _count_calls(monkeypatch, est_mod, "full_attention", calls)
    ours = model(x, None, mu, t, spks, cond)
    assert calls["full_attention"] == 4, calls  # down, 2 mid, up: one transformer block each
    ready = kernels.full_attention_ready
    monkeypatch.setattr(kernels, "full_attention_ready", lambda: False)
    aten = model(x, None, mu, t, spks, cond)
    assert calls["full_attention"] == 4
    torch.testing.assert_close(ours, aten, rtol=0, atol=2e-5 * aten.abs().max().item())
    monkeypatch.setattr(kernels, "full_attention_ready", ready)
    mask = torch.ones(2, 1, 70)
    model(x, mask, mu, t, spks, cond)  # with a padding mask: SDPA with the key bias, not our kernel
    assert calls["full_attention"] == 4


def _layer_norm_fp64(x, add, w, b, mish):
    import torch.nn.functional as F

    x64 = x.double() + (0 if add is None else add.double())
    y = F.layer_norm(x64, x.shape[-1:], w.double(), b.double(), 1e-5)
    return F.mish(y) if mish else y


@pytest.mark.parametrize("c", [256, 80, 7, 1])
@pytest.mark.parametrize("mish", [False, True])
@pytest.mark.parametrize("with_add", [False, True])
def test_layer_norm_fused_matches_fp64(ops, c, mish, with_add):
    """The estimator's LayerNorm (+ the pending GEMM bias added into x in place, + Mish) in one pass: vector bodies
    and scalar tails. fp32 rounding only: observed <= 2e-6 on outputs of |y| <~ 10, like ATen's own LayerNorm."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(3, 37, c, generator=g) * 3 + 1
    w, b, add = (torch.randn(c, generator=g) for _ in range(3))
    add = add if with_add else None
    xx = x.clone()
    y = ops.layer_norm_fused(xx, add, w, b, 1e-5, mish)
    want = _layer_norm_fp64(x, add, w, b, mish)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(xx, x if add is None else x + add, rtol=0, atol=0)  # x + add written into x


def test_layer_norm_mish_and_gelu_extremes(ops):
    """Huge, tiny and zero inputs: Mish and GELU stay finite and exact at the ends (x, or 0 below the range)."""
    import torch.nn.functional as F

    v = torch.tensor([-1e4, -200.0, -90.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 90.0, 200.0, 1e4, 0.0, 0.0, 0.0])
    y = v.clone().view(1, -1)
    ops.bias_gelu_(y, torch.zeros(16))
    torch.testing.assert_close(y[0].double(), F.gelu(v.double()), rtol=1e-5, atol=1e-7)
    # Mish after a LayerNorm of weight 0: the bias alone reaches Mish, so it sees exactly v
    m = ops.layer_norm_fused(torch.randn(1, 16), None, torch.zeros(16), v, 1e-5, True)
    torch.testing.assert_close(m[0].double(), F.mish(v.double()), rtol=1e-5, atol=1e-7)
    flat = ops.layer_norm_fused(torch.full((2, 256), 3.0), None, torch.ones(256), torch.zeros(256), 1e-5, False)
    assert torch.equal(flat, torch.zeros(2, 256))  # zero variance: (x - mean) = 0 exactly, no NaN


@pytest.mark.parametrize("n", [1024, 33, 1])
def test_bias_gelu_matches_fp64(ops, n):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(n)
    y0, bias = torch.randn(2, 5, n, generator=g) * 4, torch.randn(n, generator=g)
    y = y0.clone()
    assert ops.bias_gelu_(y, bias) is None
    torch.testing.assert_close(y.double(), F.gelu(y0.double() + bias.double()), rtol=0, atol=2e-6)


def _snake_fp64(x, alpha):
    """HiFT's Snake in fp64 on the fp32 argument alpha * x (as the kernel rounds it), the reference's formula."""
    t = (x * alpha[None, :, None]).double()  # fp32 product, then fp64
    inv = (1.0 / (alpha + 1e-9)).double()[None, :, None]  # fp32, as the reference computes it
    return x.double() + torch.sin(t) ** 2 * inv


@pytest.mark.parametrize("c", [64, 7, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_snake_matches_fp64(ops, c, channels_last):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, 301, generator=g) * 5
    x[0, :, :40] *= 400  # large |alpha x|: many periods of the Cody-Waite reduction
    x[1, 0, 5] = 3e4  # beyond the vector path (std::sin for that vector)
    x[1, -1, 7] = 0.0
    alpha = torch.rand(c, generator=g) * 2 + 0.05
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, C, T) over (B, T, C) memory, as HiFT's convs give
    y = ops.snake(x, alpha)
    assert y.shape == x.shape and y.stride() == x.stride()
    ref = _snake_fp64(x, alpha)
    tol = 1e-6 * (x.double().abs() + (1.0 / alpha.double())[None, :, None]) + 1e-7
    assert bool(((y.double() - ref).abs() <= tol).all()), float(((y.double() - ref).abs() / tol).max())


def test_snake_in_hift_with_and_without_the_kernel(ops, monkeypatch):
    """A Snake module on a channels-last activation: the kernel (the CPU default) against ATen's four passes, and
    the kernel is really called (so the comparison can fail)."""
    from chatterbox_fast.models.s3gen import hift as hift_mod

    act = hift_mod.Snake(32)
    with torch.no_grad():
        act.alpha.uniform_(0.2, 2.0)
    x = (torch.randn(1, 500, 32) * 3).transpose(1, 2)  # channels-last (B, C, T)
    calls = {"snake": 0}
    _count_calls(monkeypatch, hift_mod, "snake", calls)
    with torch.inference_mode():
        ours = act(x)
        assert calls == {"snake": 1}
        monkeypatch.setattr(kernels, "elementwise_ready", lambda: False)
        aten = act(x)
    assert calls == {"snake": 1}
    torch.testing.assert_close(ours, aten, rtol=0, atol=2e-6 * aten.abs().max().item())


def test_snake_bad_inputs(ops):
    with pytest.raises(RuntimeError, match=r"x must be a \(B, C, T\) float32"):
        ops.snake(torch.zeros(2, 4, 8).double(), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"x must be a \(B, C, T\) float32"):
        ops.snake(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"alpha must be a contiguous \(4,\)"):
        ops.snake(torch.zeros(2, 4, 8), torch.ones(5))
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        ops.snake(torch.zeros(2, 8, 4).transpose(0, 2), torch.ones(8))


def test_elementwise_bad_inputs(ops):
    x, w = torch.zeros(4, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        ops.layer_norm_fused(x.double(), None, w, w, 1e-5, False)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        ops.layer_norm_fused(torch.zeros(8, 4).T, None, w, w, 1e-5, False)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(8,\)"):
        ops.layer_norm_fused(x, None, torch.ones(7), w, 1e-5, False)
    with pytest.raises(RuntimeError, match=r"add must be a contiguous \(8,\)"):
        ops.layer_norm_fused(x, torch.ones(4), w, w, 1e-5, False)
    with pytest.raises(RuntimeError, match="empty rows"):
        ops.layer_norm_fused(torch.zeros(4, 0), None, torch.ones(0), torch.ones(0), 1e-5, False)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous \(8,\)"):
        ops.bias_gelu_(x, torch.ones(4))
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        ops.bias_gelu_(x.bfloat16(), w)


def test_estimator_with_and_without_our_elementwise_passes(ops, monkeypatch):
    """The estimator through our fused LayerNorm / Mish / GELU passes (the CPU default once loaded) vs ATen's ops,
    same weights and inputs, with and without a padding mask: the velocities agree to fp32 noise, and the passes
    are really called (so the comparison can fail)."""
    from chatterbox_fast.models.s3gen import estimator as est_mod

    model, (x, mu, t, spks, cond) = _tiny_estimator(2)
    calls = {"layer_norm_fused": 0, "bias_gelu_": 0}
    for name in calls:
        _count_calls(monkeypatch, est_mod, name, calls)
    mask = torch.ones(2, 1, 70)
    mask[1, :, 60:] = 0
    ours = [model(x, m, mu, t, spks, cond) for m in (None, mask)]
    # per call: 8 blocks x 2 norms + 4 resnets x 2 conv blocks + the final block; 8 GELUs
    assert calls == {"layer_norm_fused": 2 * (16 + 8 + 1), "bias_gelu_": 2 * 8}, calls
    monkeypatch.setattr(kernels, "elementwise_ready", lambda: False)
    aten = [model(x, m, mu, t, spks, cond) for m in (None, mask)]
    assert calls == {"layer_norm_fused": 50, "bias_gelu_": 16}
    for a, b in zip(ours, aten):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())


def test_extreme_values_are_not_clipped(ops):
    """-128 (never produced by our quantiser, but valid int8) and large activations widen exactly."""
    x = torch.tensor([[1e6, -3.0, 0.5] * 6])
    w = torch.tensor([[-128, 127, 1] * 6], dtype=torch.int8)
    ref, tol = _ref(x, w, torch.ones(1))
    assert abs(float(ops.int8_linear(x, w, torch.ones(1))) - float(ref)) <= float(tol)


def test_bad_inputs_give_clear_errors(ops):
    x, w, s = torch.randn(2, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        ops.int8_linear(x.double(), w, s)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        ops.int8_linear(torch.randn(16, 2).T, w, s)
    with pytest.raises(RuntimeError, match="w must be a contiguous"):
        ops.int8_linear(x, w.float(), s)
    with pytest.raises(RuntimeError, match="has K = 16 but w has K = 15"):
        ops.int8_linear(x, torch.zeros(8, 15, dtype=torch.int8), s)
    with pytest.raises(RuntimeError, match="scale must be"):
        ops.int8_linear(x, w, torch.ones(7))
    with pytest.raises(RuntimeError, match="w must be a contiguous"):
        ops.bf16_linear(x, w)


def test_ops_trace_into_one_compiled_graph(ops):
    from helpers import skip_unless_compile_works

    skip_unless_compile_works()
    w8, s = torch.randint(-127, 128, (24, 32), dtype=torch.int8), torch.rand(24)
    wb = torch.randn(24, 32).bfloat16()

    nw, nb = torch.randn(24), torch.randn(24)

    def f(x):
        a = x.view(2, 4, 2, 4)  # (B, T, H, D) view for the attention
        attn = ops.full_attention(a, a, a, 0.5).reshape(2, 32)[:, :24]
        y = ops.int8_linear(x, w8, s) + ops.bf16_linear(x, wb) + attn
        h = ops.layer_norm_fused(y, nb, nw, nb, 1e-5, True)  # adds nb into y in place
        ops.bias_gelu_(h, nw)
        return h + y

    x = torch.randn(2, 32)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(got, f(x), rtol=0, atol=0)


def test_disabled_by_environment_falls_back(tmp_path):
    code = """
        from chatterbox_fast import kernels
        assert kernels.load() is False and not kernels.available()
        assert "CHATTERBOX_FAST_CPU_KERNELS" in kernels.error()
    """
    env = dict(os.environ, CHATTERBOX_FAST_CPU_KERNELS="0")
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, env=env, timeout=120)


def test_a_failed_build_warns_once_and_returns_false(tmp_path):
    """No compiler (CXX points nowhere): load() is False with the reason, logged once; nothing raises."""
    code = """
        import logging
        logging.basicConfig(level=logging.WARNING)
        from chatterbox_fast import kernels
        assert kernels.load() is False and kernels.load() is False
        assert "no C++ compiler" in kernels.error(), kernels.error()
    """
    env = dict(os.environ, CXX="/nonexistent/c++", XDG_CACHE_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=120, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("CPU kernels unavailable") == 1, res.stderr


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_other_isa_builds_match_fp64(isa, tmp_path):
    """The AVX2 (most AMD / older Intel CPUs) and portable builds, each in its own process (one op library per
    process). Both run on this machine (it has AVX-512, hence AVX2)."""
    if isa == "avx2" and not torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX2", "AVX512")):
        pytest.skip("this CPU has no AVX2")
    code = """
        import torch
        from chatterbox_fast import kernels
        assert kernels.load(), kernels.error()
        assert kernels.isa() == "%s"
        g = torch.Generator().manual_seed(0)
        for m, n, k in [(2, 9, 17), (3, 40, 100), (2, 1, 7), (3, 16, 128)]:
            x = torch.randn(m, k, generator=g)
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            s = torch.rand(n, generator=g)
            wb = torch.randn(n, k, generator=g).bfloat16()
            if n %% 8 == 0 and k %% 64 == 0:
                from chatterbox_fast.quantize import pack_weight
                assert torch.equal(torch.ops.chatterbox_fast.int8_linear_packed(x, pack_weight(w), s),
                                   torch.ops.chatterbox_fast.int8_linear(x, w, s))
                wb = w.bfloat16()
                assert torch.equal(torch.ops.chatterbox_fast.bf16_linear_packed(x, pack_weight(wb)),
                                   torch.ops.chatterbox_fast.bf16_linear(x, wb))
            for y, w64 in [(torch.ops.chatterbox_fast.int8_linear(x, w, s), w.double() * s.double()[:, None]),
                           (torch.ops.chatterbox_fast.bf16_linear(x, wb), wb.double())]:
                ref = x.double() @ w64.T
                tol = 1e-6 * (x.double().abs() @ w64.abs().T) + 1e-7
                assert bool(((y.double() - ref).abs() <= tol).all()), (kernels.isa(), m, n, k)
        for t, d in [(5, 64), (49, 64), (33, 16)]:  # the estimator attention (AVX2 tiles for d = 64; else a loop)
            q, k, v = (torch.randn(2, t, 3, d, generator=g) for _ in range(3))
            y = torch.ops.chatterbox_fast.full_attention(q, k, v, d ** -0.5).double()
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(a.double().transpose(1, 2) for a in (q, k, v)), scale=d ** -0.5).transpose(1, 2)
            assert float((y - ref).abs().max()) < 5e-6, (kernels.isa(), t, d)
        assert kernels.full_attention_ready() == (kernels.isa() == "avx2")
        assert kernels.elementwise_ready() == (kernels.isa() == "avx2")
        for c in (256, 7):  # the estimator's LayerNorm (+ add, + Mish) and bias + GELU passes
            x, w, b, a = torch.randn(5, c, generator=g) * 3, *(torch.randn(c, generator=g) for _ in range(3))
            for mish in (False, True):
                y = torch.ops.chatterbox_fast.layer_norm_fused(x.clone(), a, w, b, 1e-5, mish).double()
                ref = torch.nn.functional.layer_norm(x.double() + a.double(), (c,), w.double(), b.double(), 1e-5)
                ref = torch.nn.functional.mish(ref) if mish else ref
                assert float((y - ref).abs().max()) < 1e-5, (kernels.isa(), c, mish)
            xs = (x * 40).reshape(1, 5, c).transpose(1, 2)  # HiFT's Snake: channels-last and contiguous
            for xx in (xs, xs.contiguous()):
                ys = torch.ops.chatterbox_fast.snake(xx, b.abs() + 0.1)
                t = (xx * (b.abs() + 0.1)[None, :, None]).double()
                ref = xx.double() + torch.sin(t) ** 2 / (b.abs() + 0.1 + 1e-9).double()[None, :, None]
                assert float((ys.double() - ref).abs().max()) < 1e-4, (kernels.isa(), c)
            y = x.clone()
            torch.ops.chatterbox_fast.bias_gelu_(y, b)
            ref = torch.nn.functional.gelu(x.double() + b.double())
            assert float((y.double() - ref).abs().max()) < 2e-6, (kernels.isa(), c)
        for k in (1, 7, 8, 33, 300):  # int8 estimator GEMMs' passes: vector bodies and scalar tails
            x = torch.randn(6, k, generator=g) * 3
            x[2] = 0
            q, s = torch.ops.chatterbox_fast.quantize_rows(x)
            amax = x.abs().amax(1)
            inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
            assert torch.equal(q, torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8)), (kernels.isa(), k)
            assert torch.equal(s, amax / 127), (kernels.isa(), k)
            acc = torch.randint(-1000, 1000, (6, k), generator=g, dtype=torch.int32)
            sw, b = torch.rand(k, generator=g), torch.randn(k, generator=g)
            want = acc.double() * s.double()[:, None] * sw.double() + b.double()
            assert torch.allclose(torch.ops.chatterbox_fast.dequant_rows(acc, s, sw, b).double(), want,
                                  rtol=1e-6, atol=1e-6), (kernels.isa(), k)
        assert not kernels.int8_attention_ready()  # the VNNI tiles are AVX-512 builds only
        for dt in (torch.float32, torch.bfloat16):  # T3's decode attention: vector path for D = 64, scalar tails
            for pos in (0, 5, 16, 37):
                q = torch.randn(2, 3, 1, 64, generator=g)
                kc, vc = (torch.randn(2, 3, 48, 64, generator=g).to(dt) for _ in range(2))
                y = torch.ops.chatterbox_fast.decode_attention(q, kc, vc, torch.tensor([pos]), 0.125).double()
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.double(), kc[:, :, :pos + 1].double(), vc[:, :, :pos + 1].double(), scale=0.125)
                assert float((y - ref).abs().max()) < 1e-5, (kernels.isa(), dt, pos)
        # the fused decode step (generation/fused.py) on a tiny int8 T3 against the module path
        import copy
        from chatterbox_fast.config import T3Config
        from chatterbox_fast.generation.decode import new_state, prefill, step_logits
        from chatterbox_fast.generation.fused import fused_step_unsupported, layer_weights
        from chatterbox_fast.models.t3 import T3
        from chatterbox_fast.quantize import quantize_t3
        torch.manual_seed(0)
        a = T3(T3Config.tiny()).eval()
        for p in a.parameters():
            torch.nn.init.normal_(p, std=0.2)
        quantize_t3(a, "int8")
        b = copy.deepcopy(a)
        from chatterbox_fast.quantize import pack_t3
        assert pack_t3(b) == 4 * T3Config.tiny().n_layers  # the fused step's layout
        x = torch.randn(2, 9, a.cfg.dim, generator=g)
        # fp32 KV cache, then int8 (per-row scales): each written and read by the op in this build
        with torch.inference_mode():
            for kv_dtype, tol in ((None, 1e-5), (torch.int8, 2e-4)):
                for m in (a, b):
                    m.kv_dtype = kv_dtype
                    m.setup_caches(2, 32)
                    prefill(m, x)
                sa, sb = new_state(a, 9, 2, "cpu"), new_state(b, 9, 2, "cpu")
                for i in range(12):
                    tok = torch.tensor([i * 5])
                    want = step_logits(a, tok, sa, 32)
                    got = torch.ops.chatterbox_fast.decode_layers(
                        b.speech_embed(tok, sb.speech_pos, 2).reshape(2, -1).contiguous(), *layer_weights(b),
                        *b.kv_cache_tensors(), b.rope, sb.input_pos, b.cfg.norm_eps)
                    got = b.speech_logits(b.tfmr.norm(got))
                    assert float((got - want).abs().max()) <= tol * float(want.abs().max()), (kernels.isa(), i)
                    for st in (sa, sb):
                        st.input_pos += 1
                        st.speech_pos += 1
        # k tokens in one call == k one-token calls, bit for bit (this build's multi-row linear tiles: a is int8
        # row-major; the speculative decoder's verification relies on it)
        op = torch.ops.chatterbox_fast.decode_layers
        with torch.inference_mode():
            c = copy.deepcopy(a)
            for m in (a, c):
                m.kv_dtype = None
                m.setup_caches(2, 32)
                prefill(m, x)
            toks = torch.tensor([3, 50, 700, 9, 11])
            s = new_state(a, 9, 2, "cpu")
            one = []
            for i in range(5):
                e = a.speech_embed(toks[i:i + 1], s.speech_pos, 2).reshape(2, -1).contiguous()
                one.append(op(e, *layer_weights(a), *a.kv_cache_tensors(), a.rope, s.input_pos, a.cfg.norm_eps))
                s.input_pos += 1
                s.speech_pos += 1
            s = new_state(c, 9, 2, "cpu")
            e = c.speech_emb(toks) + c.speech_pos_emb.emb(s.speech_pos + torch.arange(5))
            many = op(e.unsqueeze(1).expand(5, 2, -1).contiguous(), *layer_weights(c), *c.kv_cache_tensors(), c.rope,
                      s.input_pos, c.cfg.norm_eps)
            assert torch.equal(many, torch.stack(one)), kernels.isa()
        assert (fused_step_unsupported(b) is None) == (kernels.isa() == "avx2"), fused_step_unsupported(b)
        x = torch.randn(2, 37, 3, 2, 64, generator=torch.Generator().manual_seed(7))
        torch.save(torch.ops.chatterbox_fast.full_attention_int8(x[:, :, 0], x[:, :, 1], x[:, :, 2], 0.125),
                   r"%s")
    """ % (isa, tmp_path / "int8_attention.pt")
    env = dict(os.environ, CHATTERBOX_FAST_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=600, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # the int8 attention's portable loop in that build: the same integer sums, exp2 and epilogues as this process's
    # build (VNNI tiles or portable), so bit-identical
    if kernels.load():
        x = torch.randn(2, 37, 3, 2, 64, generator=torch.Generator().manual_seed(7))
        here = torch.ops.chatterbox_fast.full_attention_int8(x[:, :, 0], x[:, :, 1], x[:, :, 2], 0.125)
        assert torch.equal(torch.load(tmp_path / "int8_attention.pt"), here)


@pytest.mark.parametrize("m,n,k", [(12, 16, 1024), (5, 20, 100), (16, 8, 48), (3, 13, 31)])
def test_bf16_linear_rows_equal_pairs(ops, m, n, k):
    """The multi-row kernel (M > 2: every weight line read once for all rows; a full block of 8 channels ends with
    one transposed 8-way reduction) gives each row bit for bit what the pair path gives it, with and without a
    partial block or a scalar K tail."""
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).bfloat16()
    got = ops.bf16_linear(x, w)
    assert got.shape == (m, n)
    for r in range(0, m, 2):
        rows = x[r:r + 2].contiguous()
        assert torch.equal(got[r:r + rows.shape[0]], ops.bf16_linear(rows, w))
    assert torch.allclose(got.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,n,k", [(12, 8194, 64), (12, 16, 1024), (5, 20, 100), (3, 13, 31), (1, 9, 16)])
def test_f32_linear_rows_equal_pairs(ops, m, n, k):
    """fp32 weights (T3's speech head in the fused step): each row's result is the same bits whatever M is (the
    k-token check computes its k B rows in one call and must match the one-token step's (B, D) call), including
    a partial last block of channels (8194 = 8 x 1024 + 2) and a scalar K tail; close to fp64."""
    g = torch.Generator().manual_seed(m + n + k + 3)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    got = ops.f32_linear(x, w)
    assert got.shape == (m, n) and got.dtype == torch.float32
    for r in range(0, m, 2):
        rows = x[r:r + 2].contiguous()
        assert torch.equal(got[r:r + rows.shape[0]], ops.f32_linear(rows, w))
    ref, tol = _ref(x, w)
    assert bool(((got.double() - ref).abs() <= tol).all()), (got.double() - ref).abs().max()
    with pytest.raises(RuntimeError, match="w must be a contiguous"):
        ops.f32_linear(x, w.bfloat16())
