"""Weight-only int8 for T3 (quantize.py): the kernel against the dequantised reference, what gets replaced, resident
bytes, the compiled decode step, the engine / CLI option, and drift against fp32 on the full random checkpoint.

Tolerances:
- Int8Linear vs the dequantised weight: our CPU kernel (kernels/cpu_linear.cpp) is fp32 throughout, so its
  result is x @ dequantised W^T up to fp32 summation order (1e-5 of sum |x| |w|). ATen's `_weight_int8pack_mm`
  (the CPU fallback) takes bf16 activations and returns bf16, so its reference is (bf16-rounded x) @ dequantised
  W^T, and the output may differ by its own bf16 rounding (2^-8 relative, plus accumulation-order noise). The
  generic fallback is fp32 throughout: 1e-5.
- compiled vs eager int8 step: same kernel in both, logits within 1e-3 abs (with ATen's kernel, bf16 outputs of
  differently fused neighbours can round differently), tokens identical.
- prefill-sized inputs on a CPU with native bf16 (`_bf16_prefill_gemm`): exactly oneDNN's bf16 GEMM of the
  bf16-rounded x (then the int8 scales in fp32), and within bf16's rounding of x and of the output (2^-8 relative
  to sum |x| |w|) of the fp32-math result. Tests of the fp32 paths turn it off (CHATTERBOX_FAST_CPU_BF16=0).
- drift on the full random checkpoint (64 teacher-forced steps): bounds ~2x above what was measured (see the
  constants at the end) so that a broken kernel or scale fails. Random weights make this a weak proxy for the
  released weights: their logits are flatter and their rows have no outliers.
"""

from __future__ import annotations

import gc
import importlib.util
import re
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import chatterbox_fast.quantize as qmod
from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast.config import T3Config
from chatterbox_fast.generation.decode import generate_tokens, kv_bucket, new_state, prefill, step_logits
from chatterbox_fast.generation.sampling import SamplingParams
from chatterbox_fast.models.t3 import T3, T3_KEYMAP
from chatterbox_fast.quantize import (QUANT_MODES, T3_INT8_TARGETS, T3_LAYER_LINEARS, Bf16Linear, Int8Linear,
                                      check_quantize_mode, int8_linear_bytes, low_precision_linear_bytes,
                                      quantize_t3, quantize_weight_int8)

from helpers import skip_unless_compile_works, tiny_t3

torch.set_grad_enabled(False)


def _tiny(seed: int = 0) -> T3:
    return tiny_t3(seed)


def _bench():
    """benchmarks/t3_int8.py as a module (its drift helpers are the ones the benchmark reports)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "t3_int8.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("t3_int8_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- kernel ---------------------------------------------------------------------------------------------------
def test_quantize_weight_is_symmetric_per_channel():
    w = torch.randn(6, 40)
    w[2] *= 100.0  # one large row must not coarsen the others (per-channel scales)
    w[4] = 0.0  # an all-zero row stays zero, no division by zero
    q, s = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[4], torch.zeros(40, dtype=torch.int8))
    assert torch.equal(s.bfloat16().float(), s)  # bf16-representable scales (what the CPU kernel takes)
    err = (q.float() * s[:, None] - w).abs()
    # round to nearest: half a step per element, plus the clamp of a max that the bf16 scale rounding put past 127
    assert bool((err <= s[:, None] / 2 + 2.0 ** -8 * w.abs().amax(1, keepdim=True) + 1e-6).all())
    assert float(s[2] / s[0]) > 20  # row 2 got its own scale


@pytest.mark.parametrize("bf16_scales", [True, False])
@pytest.mark.parametrize("k", [1, 15, 16, 33, 1024])
def test_quantize_weight_kernel_is_bit_identical_to_the_torch_formula(k, bf16_scales):
    """The C++ op (T3's int8 copies at load) against quantize_weight_int8's PyTorch formula: the same bits."""
    if not cpu_kernels.load():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.error()}")
    g = torch.Generator().manual_seed(k)
    big = torch.randn(40, k + 3, generator=g) * torch.logspace(-30, 30, 40)[:, None]  # scales far apart
    big[5] = 0.0  # an all-zero row: scale 1, q 0
    if k >= 16:  # exact ties: max 127 * 2^-7 gives s = 2^-7 (bf16 too), and w / s = j + 0.5 rounds half to even
        big[9, 1:1 + k] = (torch.arange(k) % 9 - 4 + 0.5) / 128
        big[9, 1] = 127 / 128
    w = big[:, 1:1 + k]  # rows with a stride (a view)
    q, s = torch.ops.chatterbox_fast.quantize_weight_int8(w, bf16_scales)
    qr, sr = qmod._quantize_weight_int8_torch(w, bf16_scales)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (40,)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert s[5] == 1 and (q[5] == 0).all()
    if k >= 16:
        assert torch.equal(q[9, 1:9], torch.tensor([-2, -2, 0, 0, 2, 2, 4, 4], dtype=torch.int8))  # half to even
    got, _ = qmod.quantize_weight_int8(w, bf16_scales)  # the public function takes the op
    assert torch.equal(got, q)
    with pytest.raises(RuntimeError, match="quantize_weight_int8: w must be"):
        torch.ops.chatterbox_fast.quantize_weight_int8(w.double(), bf16_scales)
    with pytest.raises(RuntimeError, match="quantize_weight_int8: w must be"):
        torch.ops.chatterbox_fast.quantize_weight_int8(w.t(), bf16_scales)  # columns not contiguous


@pytest.mark.parametrize("kernel", ["ours", "int8pack"])
@pytest.mark.parametrize("shape", [(2, 64), (2, 1, 64), (3, 5, 64)])
def test_int8_linear_matches_dequantised_reference(monkeypatch, shape, kernel):
    if kernel == "ours":
        if not cpu_kernels.load():
            pytest.skip(f"our CPU kernel is unavailable: {cpu_kernels.error()}")
    else:
        if not qmod._HAS_INT8PACK:
            pytest.skip("this torch has no _weight_int8pack_mm")
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(*shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    w = m.dequantized_weight()
    if kernel == "ours":
        ref = x @ w.T
        tol = 1e-5 * (x.abs() @ w.abs().T) + 1e-6  # fp32 accumulation order only: no rounding of x or y
    else:
        xb = x.bfloat16().float()
        ref = xb @ w.T
        tol = 2.0 ** -8 * ref.abs() + 1e-5 * (xb.abs() @ w.abs().T)  # bf16 output rounding + fp32 accumulation
    assert bool(((y - ref).abs() <= tol).all()), (y - ref).abs().max()
    # and int8 stays close to the float layer it replaced (per-channel int8 on Gaussian weights: ~1 % of the output)
    assert (y - lin(x)).abs().max().item() <= 0.05 * lin(x).abs().max().item()


@pytest.mark.parametrize("has_op, rows", [(False, 4), (True, qmod.CPU_KERNEL_MAX_ROWS + 1)])
def test_int8_linear_fallback_path_is_exact_dequantised_matmul(monkeypatch, has_op, rows):
    """The generic path (CUDA / MPS / torch without the op; CPU prefill, more rows than the kernel is good for):
    F.linear with the dequantised weight, fp32 throughout."""
    monkeypatch.setattr(qmod, "_HAS_INT8PACK", has_op)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "0")  # no bf16 prefill GEMM (tested below)
    torch.manual_seed(0)
    m = Int8Linear.from_linear(nn.Linear(32, 16, bias=False))
    x = torch.randn(1, rows, 32)
    torch.testing.assert_close(m(x), x @ m.dequantized_weight().T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["ours", "fallback"])
@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 64), (1, qmod.CPU_KERNEL_MAX_ROWS + 1, 64)])
def test_bf16_linear_is_fp32_math_on_the_bf16_weight(monkeypatch, shape, kernel):
    """Weight-only bf16: the result is x @ bf16(W)^T in fp32, with no rounding of x or of the output (decode-sized
    inputs always; prefill-sized ones where the CPU has no native bf16, forced here)."""
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "0")
    if kernel == "ours":
        if not cpu_kernels.load():
            pytest.skip(f"our CPU kernel is unavailable: {cpu_kernels.error()}")
    else:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    m = Bf16Linear.from_linear(lin)
    assert m.weight_bf16.dtype == torch.bfloat16 and not list(m.parameters())
    x = torch.randn(*shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    w = lin.weight.bfloat16().float()
    ref = x @ w.T
    assert bool(((y - ref).abs() <= 1e-5 * (x.abs() @ w.abs().T) + 1e-6).all()), (y - ref).abs().max()
    # and bf16 weights stay within bf16's rounding of the float layer (relative 2^-9 per weight)
    assert (y - lin(x)).abs().max().item() <= 2.0 ** -8 * (x.abs() @ lin.weight.abs().T).max().item()
    with pytest.raises(ValueError, match="bias"):
        Bf16Linear.from_linear(nn.Linear(4, 4, bias=True))


def test_quantize_t3_bf16_replaces_the_layer_linears():
    model = _tiny()
    names = sorted(f"tfmr.layers.{i}.{p}" for i in range(model.cfg.n_layers) for p in T3_INT8_TARGETS)
    ref = _tiny()
    quantize_t3(model, "bf16")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Bf16Linear)) == names
    cfg = model.cfg
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.intermediate_size
    assert low_precision_linear_bytes(model) == cfg.n_layers * per_layer * 2 and int8_linear_bytes(model) == 0
    quantize_t3(model, "int8")  # a converted model stays as it is
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    torch.manual_seed(1)
    x = torch.randn(2, 20, cfg.dim)
    for m in (ref, model):
        m.setup_caches(2, 64)
    a, b = prefill(ref, x), prefill(model, x)
    assert (a - b).abs().max().item() <= 0.01 * a.abs().max().item()


@pytest.mark.parametrize("packed", [False, True])
def test_quantized_linears_run_prefill_as_a_bf16_gemm_on_native_bf16_cpus(monkeypatch, packed):
    """Prefill-sized inputs (> CPU_KERNEL_MAX_ROWS rows) on a CPU with native bf16: one bf16 GEMM (the int8 values
    are exact in bf16), scales applied in fp32; within bf16 rounding of the fp32-math result. Decode-sized inputs
    and CPUs without native bf16 (CHATTERBOX_FAST_CPU_BF16=0) keep fp32 math."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 48, bias=False)
    i8, b16 = Int8Linear.from_linear(lin), Bf16Linear.from_linear(lin)
    if packed:
        assert i8.pack_() and b16.pack_()
    x = torch.randn(2, qmod.CPU_KERNEL_MAX_ROWS, 128)  # 128 rows
    wq, wb = i8.row_major_weight(), b16.row_major_weight()
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "1")
    y8, yb = i8(x), b16(x)
    assert y8.dtype == yb.dtype == torch.float32 and y8.shape == yb.shape == (2, qmod.CPU_KERNEL_MAX_ROWS, 48)
    xb = x.bfloat16()
    assert torch.equal(y8, nn.functional.linear(xb, wq.bfloat16()).float() * i8.scale)
    assert torch.equal(yb, nn.functional.linear(xb, wb).float())
    for y, w in ((y8, i8.dequantized_weight()), (yb, wb.float())):
        ref = x @ w.T
        assert bool(((y - ref).abs() <= 2.0 ** -7 * (x.abs() @ w.abs().T)).all())
        assert (y - ref).abs().max() > 0  # it did round: this is the bf16 path
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "0")
    torch.testing.assert_close(i8(x), x @ i8.dequantized_weight().T, atol=1e-5, rtol=0)
    torch.testing.assert_close(b16(x), x @ wb.float().T, atol=1e-5, rtol=0)
    monkeypatch.setenv("CHATTERBOX_FAST_CPU_BF16", "1")
    x2 = torch.randn(2, 128)  # decode-sized: never the bf16 GEMM
    ref = x2 @ wb.float().T
    assert bool(((b16(x2) - ref).abs() <= 1e-5 * (x2.abs() @ wb.float().abs().T) + 1e-6).all())


def test_int8_linear_rejects_bias():
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_linear(nn.Linear(4, 4, bias=True))


@pytest.mark.parametrize("rows", [1, 2, 3, 65])
def test_packed_int8_linear_matches_row_major(rows):
    """Int8Linear.pack_ (the fused CPU step's layout): the same outputs on every path: our kernel for decode-sized
    inputs (bit-identical, or within 1e-4 of the largest output where the packed kernel rounds x to int16:
    AVX-512 builds), the unpacked fallbacks for prefill-sized ones (bit-identical); dequantized_weight unchanged."""
    torch.manual_seed(rows)
    lin = Int8Linear.from_linear(nn.Linear(128, 24, bias=False))
    packed = Int8Linear.from_linear(nn.Linear(128, 24, bias=False))
    packed.load_state_dict(lin.state_dict())
    assert packed.pack_() and packed.packed and not lin.packed and packed.pack_()  # idempotent
    assert packed.weight_int8.shape == (3, 2, 8, 64) and "packed" in repr(packed)
    assert torch.equal(packed.dequantized_weight(), lin.dequantized_weight())
    x = torch.randn(rows, 128)
    if rows <= qmod.CPU_KERNEL_MAX_ROWS and cpu_kernels.int8_packed_int16_activations():
        want = lin(x)
        assert 0 < (packed(x) - want).abs().max() <= 1e-4 * want.abs().max()
    else:
        assert torch.equal(packed(x), lin(x))
    odd = Int8Linear.from_linear(nn.Linear(100, 24, bias=False))  # K % 64 != 0: left row-major
    assert not odd.pack_() and not odd.packed
    b = Bf16Linear.from_linear(nn.Linear(96, 16, bias=False))  # bf16: lines of 32 columns
    pb = Bf16Linear.from_linear(nn.Linear(96, 16, bias=False))
    pb.load_state_dict(b.state_dict())
    assert pb.pack_() and pb.weight_bf16.shape == (2, 3, 8, 32) and "packed" in repr(pb)
    xb = torch.randn(rows, 96)
    assert torch.equal(pb(xb), b(xb))


def test_pack_t3_packs_every_layer_linear():
    model = quantize_t3(_tiny())
    x = torch.randn(2, 40, model.cfg.dim)  # 80 rows: above CPU_KERNEL_MAX_ROWS, the unpacked fallback
    model.setup_caches(2, 48)
    before = prefill(model, x)
    assert qmod.pack_t3(model) == model.cfg.n_layers * len(T3_INT8_TARGETS)
    assert all(m.packed for m in model.modules() if isinstance(m, Int8Linear))
    assert qmod.int8_linear_bytes(model) == qmod.int8_linear_bytes(quantize_t3(_tiny()))  # no copy kept
    assert torch.equal(prefill(model, x), before)  # prefill (rows > 64) runs on an unpacked temporary


# ---- quantize_t3 ----------------------------------------------------------------------------------------------
def test_quantize_t3_replaces_exactly_the_layer_linears_and_frees_fp32():
    model = _tiny()
    names = [f"tfmr.layers.{i}.{p}" for i in range(model.cfg.n_layers) for p in T3_INT8_TARGETS]
    originals = [f"tfmr.layers.{i}.{p}" for i in range(model.cfg.n_layers) for p in T3_LAYER_LINEARS]
    refs = [weakref.ref(model.get_submodule(n).weight) for n in originals]
    head = model.speech_head.weight
    untouched = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in originals}
    out = quantize_t3(model)
    assert out is model
    got = sorted(n for n, m in model.named_modules() if isinstance(m, Int8Linear))
    assert got == sorted(names)
    # everything else is the same module object, untouched (speech/text heads, conditioning encoder)
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} == untouched
    assert model.speech_head.weight is head and head.dtype == torch.float32
    gc.collect()
    assert all(r() is None for r in refs), "a float weight of a quantised linear is still alive"
    # resident bytes: int8 weights + fp32 and bf16 scales, nothing float of weight size
    cfg = model.cfg
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.intermediate_size
    n_out = 4 * cfg.dim + 2 * cfg.intermediate_size + cfg.dim
    assert int8_linear_bytes(model) == cfg.n_layers * (per_layer + n_out * (4 + 2))
    for m in model.modules():
        if isinstance(m, Int8Linear):
            assert [b.dtype for b in m.buffers()] == [torch.int8, torch.float32, torch.bfloat16]
            assert not list(m.parameters())
    quantize_t3(model)  # idempotent
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Int8Linear)) == sorted(names)


@pytest.mark.parametrize("bad", ["int4", "INT8", "", "fp8", 8])
def test_bad_mode_raises_naming_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="int8"):
        quantize_t3(_tiny(), bad)
    with pytest.raises(ValueError, match="int8"):
        check_quantize_mode(bad)
    assert check_quantize_mode(None) is None and QUANT_MODES == ("int8", "bf16")


def test_quantized_t3_generates_close_to_fp32():
    """Tiny model: the int8 prefill logits stay close to fp32 and a whole generation runs."""
    fp32, int8 = _tiny(), quantize_t3(_tiny())
    torch.manual_seed(1)
    x = torch.randn(2, 20, fp32.cfg.dim)
    for m in (fp32, int8):
        m.setup_caches(2, 64)
    a, b = prefill(fp32, x), prefill(int8, x)
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()
    gen = torch.Generator().manual_seed(0)
    out = generate_tokens(int8, x, SamplingParams(max_new_tokens=10, min_p=0.0), generator=gen)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 10


# ---- compiled decode step -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compile_works():
    skip_unless_compile_works()


@pytest.mark.parametrize("freezing", [False, True])
def test_compiled_int8_step_matches_eager_and_keeps_int8_weights(compile_works, freezing):
    """compile_decode_step on an int8 T3: same logits / tokens as eager, and the generated code calls the int8
    kernel on the int8 weights: no float copy of a quantised weight is made (freezing would constant-fold an
    in-graph dequantisation into one, the trap of the issue)."""
    from torch._inductor.utils import run_and_get_code

    from chatterbox_fast.generation.compile import compile_decode_step

    model = quantize_t3(_tiny())
    if not (cpu_kernels.available() or qmod._HAS_INT8PACK):
        pytest.skip("no CPU int8 kernel (ours did not build, and this torch has no _weight_int8pack_mm)")
    S, n = 30, 20
    model.setup_caches(2, S + n)
    torch.manual_seed(1)
    x = torch.randn(2, S, model.cfg.dim)
    params = SamplingParams(max_new_tokens=n, min_p=0.0, temperature=1.5)
    step = compile_decode_step(model, freezing=freezing)
    _, code = run_and_get_code(step.warm_up, 2, params)
    assert step.is_compiled, step.fallback_reason
    src = "\n".join(code)
    n_lin = model.cfg.n_layers * len(T3_INT8_TARGETS)
    # every quantised linear runs an int8 kernel: ours (kernels/cpu_linear.cpp) when it built, else ATen's
    kernel = "chatterbox_fast.int8_linear" if cpu_kernels.available() else "_weight_int8pack_mm("
    assert src.count(kernel) >= n_lin, kernel
    # no float tensor of a quantised weight's shape is allocated per call, nor held as a frozen constant (with the
    # dequantise-in-graph form and freezing, inductor folds every weight back to a float32 constant of its shape)
    cfg = model.cfg
    shapes = {(cfg.dim, cfg.dim), (cfg.intermediate_size, cfg.dim), (cfg.dim, cfg.intermediate_size)}
    for n, k in shapes:
        assert f"(({n}, {k}), ({k}, 1), torch.float32)" not in src
    frozen = re.findall(r"_frozen_param\d+ = None  # device\(type='cpu'\) torch\.(\w+) \((\d+), (\d+)\)", src)
    frozen = [(dt, (int(n), int(k))) for dt, n, k in frozen]
    assert all(dt == "int8" for dt, shape in frozen if shape in shapes), frozen
    if freezing:
        assert sum(dt == "int8" for dt, _ in frozen) == n_lin, frozen  # the int8 weights are the constants
    else:
        assert not frozen
    # same tokens as eager (same noise)
    with torch.inference_mode():
        xi = x.clone()
        want = generate_tokens(model, xi, params, generator=torch.Generator().manual_seed(3))
        got = generate_tokens(model, xi, params, generator=torch.Generator().manual_seed(3), step_fn=step)
        assert torch.equal(got, want)
        st = new_state(model, S, 2, "cpu")
        prefill(model, xi)
        tok, kv_len = torch.tensor([7]), kv_bucket(S + 1, model.max_seq)
        eager = step_logits(model, tok, st, kv_len)
        with step._config():  # the freezing flag it was compiled with (dynamo guards on it)
            comp = step._compiled(model, tok, st, kv_len)
    assert (eager - comp).abs().max().item() <= 1e-3
    assert step.is_compiled


# ---- engine and CLI -------------------------------------------------------------------------------------------
def _fake_parts(*_a, **_k):
    from chatterbox_fast.loading import Components

    return Components(t3=_tiny(), s3gen=None, conditioner=None, tokenizer=None, conds=None)


def test_engine_quantize_option(monkeypatch, tmp_path):
    import chatterbox_fast.engine as engine

    monkeypatch.setattr(engine, "load_components", _fake_parts)
    tts = engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", enable_watermark=False, quantize="int8")
    assert sum(isinstance(m, Int8Linear) for m in tts.t3.modules()) == 2 * len(T3_INT8_TARGETS)
    # and a bf16 KV cache where our decode attention reads it (AVX-512 builds); exact fp32 keeps an fp32 cache
    want_kv = torch.bfloat16 if cpu_kernels.decode_attention_ready() else None
    assert tts.t3.kv_dtype == want_kv
    tts.t3.setup_caches(2, 64)
    assert tts.t3.tfmr.layers[0].self_attn.kv_cache.k_cache.dtype == (want_kv or torch.float32)
    plain = engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", enable_watermark=False)
    assert not any(isinstance(m, Int8Linear) for m in plain.t3.modules())
    assert plain.t3.kv_dtype is None
    monkeypatch.setattr(engine, "download_checkpoint", lambda *a, **k: tmp_path)
    tts = engine.OptimizedChatterboxTTS.from_pretrained(device="cpu", enable_watermark=False, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in tts.t3.modules())


def test_engine_mixed_precision_on_cpu_is_bf16_weights(monkeypatch, tmp_path):
    """use_mixed_precision=True on a CPU: T3's layer linears get bf16 weights with fp32 math (when our kernel
    builds; otherwise one warning and fp32); with quantize="int8" too, int8 is kept."""
    import warnings

    import chatterbox_fast.engine as engine

    monkeypatch.setattr(engine, "load_components", _fake_parts)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tts = engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", enable_watermark=False,
                                                       use_mixed_precision=True)
    n_bf16 = sum(isinstance(m, Bf16Linear) for m in tts.t3.modules())
    warned = [w for w in record if "use_mixed_precision" in str(w.message)]
    if cpu_kernels.available():
        assert n_bf16 == 2 * len(T3_INT8_TARGETS) and not warned
    else:
        assert n_bf16 == 0 and len(warned) == 1
    tts = engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", enable_watermark=False,
                                                   use_mixed_precision=True, quantize="int8")
    assert sum(isinstance(m, Int8Linear) for m in tts.t3.modules()) == 2 * len(T3_INT8_TARGETS)
    assert not any(isinstance(m, Bf16Linear) for m in tts.t3.modules())


def test_engine_rejects_bad_quantize_before_loading(monkeypatch, tmp_path):
    import chatterbox_fast.engine as engine

    def boom(*a, **k):
        raise AssertionError("loaded the checkpoint before validating quantize=")

    monkeypatch.setattr(engine, "load_components", boom)
    with pytest.raises(ValueError, match="'int8'"):
        engine.OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", quantize="int4")


def test_cli_quantize_flag(monkeypatch, capsys):
    import chatterbox_fast.cli as cli
    import chatterbox_fast.engine as engine

    seen = {}

    def from_local(ckpt_dir, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(engine.OptimizedChatterboxTTS, "from_local", staticmethod(from_local))
    assert cli.main(["speak", "hi", "--ckpt-dir", "/nonexistent", "--quantize", "int8"]) == 2
    assert seen["quantize"] == "int8"
    seen.clear()
    assert cli.main(["speak", "hi", "--ckpt-dir", "/nonexistent"]) == 2
    assert seen["quantize"] is None
    with pytest.raises(SystemExit):
        cli.main(["speak", "hi", "--quantize", "int4"])
    assert "int8" in capsys.readouterr().err


# ---- drift on the full random checkpoint ----------------------------------------------------------------------
def test_int8_and_bf16_drift_on_full_random_checkpoint(oracle_ckpt, oracle_state):
    """64 teacher-forced steps of the full-size model, int8 (and bf16 weights) vs fp32 (same prefill, same forced
    tokens): processed next-token distributions (CFG, penalty, temperature, min-p) close in total variation, most
    top-1 ids equal."""
    from chatterbox_fast.weights import load_strict

    bench = _bench()
    state = oracle_state("t3_cfg.safetensors")

    def load(fmt):
        with torch.device("meta"):
            m = T3(T3Config())
        load_strict(m, state, T3_KEYMAP, name="t3_cfg.safetensors")
        return quantize_t3(m.eval(), fmt) if fmt else m.eval()

    fp32 = load(None)
    x = bench.t3_decode.prefill_input(fp32, oracle_ckpt, 60)
    tokens = bench.teacher_tokens(64)
    ref = bench.teacher_forced_logits(fp32, x, tokens)
    del fp32
    for fmt, (tv_mean, tv_max, kl_mean, top1) in DRIFT_BOUNDS.items():
        model = load(fmt)
        d = bench.distribution_drift(ref, bench.teacher_forced_logits(model, x, tokens), tokens)
        del model
        print(f"{fmt} drift (random weights, {d['steps']} steps): TV mean {d['tv_mean']:.4f} max {d['tv_max']:.4f}, "
              f"KL mean {d['kl_mean']:.6f}, top-1 agreement {d['top1_agreement']:.3f}")
        assert d["steps"] == 65
        assert d["tv_mean"] <= tv_mean and d["tv_max"] <= tv_max, (fmt, d)
        assert d["kl_mean"] <= kl_mean, (fmt, d)
        assert d["top1_agreement"] >= top1, (fmt, d)


# Measured (torch 2.13, benchmarks/t3_int8.py, 65 steps): int8 (2026-11-27, ATen kernel, bf16 activations) TV mean
# 0.017, max 0.036, KL mean 2.8e-4, top-1 0.92; int8 with our fp32-activation kernel (2026-11-28) TV mean 0.016, max
# 0.031, KL 2.6e-4, top-1 0.95; bf16 weights (2026-11-28, our kernel) TV mean 0.0036, max 0.0116, KL 1e-5, top-1
# 1.0. Bounds ~2x above, to catch gross errors (a
# wrong or transposed scale, activations cast wrong, a missing layer), not to certify quality: random Gaussian rows
# all have similar ranges, so even per-tensor scales would pass here, and real weights (outlier rows, peaked logits)
# drift differently.
DRIFT_BOUNDS = {  # format -> (TV mean, TV max, KL mean, top-1 agreement at least)
    "int8": (0.04, 0.08, 1e-3, 0.8),
    "bf16": (0.008, 0.025, 5e-5, 0.95),
}
