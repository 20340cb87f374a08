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


@pytest.mark.parametrize("pos, kv_len", [(0, 128), (5, 128), (127, 128), (128, 256), (300, 384), (999, 1024)])
def test_decode_attention_matches_masked_sdpa(ops, pos, kv_len):
    """T3's decode attention: one query per (batch, head) over cache slots <= pos, as SDPA with the step's mask."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(pos)
    kc, vc = torch.randn(2, 16, 1024, 64, generator=g), torch.randn(2, 16, 1024, 64, generator=g)
    q = torch.randn(2, 1, 16, 64, generator=g).transpose(1, 2)  # (B, H, 1, D), strided as in T3
    ip = torch.tensor([pos])
    mask = torch.arange(kv_len)[None, :] <= ip[:, None]
    want = F.scaled_dot_product_attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=mask)
    got = ops.decode_attention(q, kc, vc, ip, 0.125)
    assert got.shape == (2, 16, 1, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    kc[:, :, pos + 1:] = float("nan")  # slots past the position are never read
    assert torch.isfinite(ops.decode_attention(q, kc, vc, ip, 0.125)).all()


def test_t3_decode_with_and_without_our_attention(ops, monkeypatch):
    """T3's decode step through our attention (CPU default once loaded) vs ATen's masked SDPA: same logits to fp32
    noise, same sampled tokens."""
    from helpers import tiny_t3

    from chatterbox_fast.generation.decode import generate_tokens
    from chatterbox_fast.generation.sampling import SamplingParams

    model = tiny_t3(0)
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
    monkeypatch.setattr(kernels, "decode_attention_ready", lambda: False)
    calls["n"] = 0
    aten = run()
    assert calls["n"] == 0
    assert torch.equal(ours, aten)


def test_decode_attention_bad_inputs(ops):
    kc = torch.zeros(2, 16, 64, 64)
    q = torch.zeros(2, 16, 1, 64)
    with pytest.raises(RuntimeError, match="outside the 64-slot cache"):
        ops.decode_attention(q, kc, kc, torch.tensor([64]), 0.125)
    with pytest.raises(RuntimeError, match="input_pos must be"):
        ops.decode_attention(q, kc, kc, torch.tensor([1, 2]), 0.125)
    with pytest.raises(RuntimeError, match="caches must be contiguous"):
        ops.decode_attention(q, kc[:, :8], kc, torch.tensor([1]), 0.125)


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

    def f(x):
        return ops.int8_linear(x, w8, s) + ops.bf16_linear(x, wb)

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
def test_other_isa_builds_match_fp64(isa):
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
        for m, n, k in [(2, 9, 17), (3, 40, 100), (2, 1, 7)]:
            x = torch.randn(m, k, generator=g)
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            s = torch.rand(n, generator=g)
            wb = torch.randn(n, k, generator=g).bfloat16()
            for y, w64 in [(torch.ops.chatterbox_fast.int8_linear(x, w, s), w.double() * s.double()[:, None]),
                           (torch.ops.chatterbox_fast.bf16_linear(x, wb), wb.double())]:
                ref = x.double() @ w64.T
                tol = 1e-6 * (x.double().abs() @ w64.abs().T) + 1e-7
                assert bool(((y.double() - ref).abs() <= tol).all()), (isa, m, n, k)
    """ % isa
    env = dict(os.environ, CHATTERBOX_FAST_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=600, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
