"""The fused CPU decode step (generation/fused.py: T3's layer stack as one `chatterbox_fast::decode_layers` call)
against the module path (decode.step_logits), on a tiny random T3, for every weight format and KV-cache dtype.

Tolerance: both paths run the same linear and attention kernels on the same fp32 activations; they differ only in
fp32 summation order (RMSNorm's sum) and FMA contraction (RoPE, SiLU), ~1e-7 relative per op, so logits agree to
1e-5 of their scale and the caches to float rounding; with a bf16 cache, a value next to a rounding boundary can
round the other way (one bf16 ulp, up to 2^-7 relative), which moves later logits by up to ~1e-4 of their scale.
Sampled tokens (same noise) are identical.
"""

from __future__ import annotations

import copy

import pytest
import torch

from chatterbox_fast import kernels
from chatterbox_fast.generation.decode import generate_tokens, kv_bucket, new_state, prefill, step_logits
from chatterbox_fast.generation.fused import FusedDecodeStep, fused_step_unsupported
from chatterbox_fast.generation.sampling import SamplingParams

from helpers import kv_caches, require_cpu_kernels, tiny_t3, tiny_t3_as

torch.set_grad_enabled(False)


@pytest.fixture(scope="module", autouse=True)
def ops():
    require_cpu_kernels()


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("fmt", [None, "int8", "int8-packed", "bf16", "bf16-packed"])
def test_fused_step_matches_module_path(fmt, kv_dtype):
    """Teacher-forced: 40 steps from position 12 on two copies of one model, module path vs fused: logits and the
    KV cache slots each writes."""
    a = tiny_t3_as(fmt, kv_dtype)
    b = copy.deepcopy(a)
    S, n = 12, 40
    x = torch.randn(2, S, a.cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for m in (a, b):
            m.setup_caches(2, 64)
            prefill(m, x)
        step = FusedDecodeStep(b)
        sa, sb = new_state(a, S, 2, "cpu"), new_state(b, S, 2, "cpu")
        # a bf16 / int8 cache value rounded the other way (one bf16 ulp, one int8 level) moves the logits more; so
        # does an activation on the other side of an int16 rounding boundary (packed int8 weights, AVX-512 builds:
        # one level is 2^-15 of the row's largest value)
        int16 = fmt == "int8-packed" and kernels.int8_packed_int16_activations()
        tol = (1e-5 if kv_dtype is None else 2e-4) * (10 if int16 else 1)
        for i in range(n):
            tok = torch.tensor([(i * 977) % 6561])
            want = step_logits(a, tok, sa, kv_bucket(S + i + 1, a.max_seq))
            got = step.step_logits(b, tok, sb, 0)
            assert got.shape == want.shape == (2, a.cfg.speech_vocab_size)
            err = (got - want).abs().max().item()
            assert err <= tol * want.abs().max().item(), (i, err)
            for s in (sa, sb):
                s.input_pos += 1
                s.speech_pos += 1
    for ca, cb in zip(kv_caches(a), kv_caches(b)):
        assert ca.dtype == cb.dtype == (kv_dtype or torch.float32)
        assert cb[:, :, S:S + n].abs().amax() > 0  # the fused step wrote its slots
        if kv_dtype == torch.int8:  # the same per-row quantiser: equal, or one level apart at a rounding boundary
            assert (cb[:, :, :S + n].int() - ca[:, :, :S + n].int()).abs().max() <= 1
        else:
            rtol = 2 ** -7 if kv_dtype is not None else 1e-5  # one bf16 ulp: 2^-8 to 2^-7 relative
            atol = 1e-4 if int16 else 1e-5
            torch.testing.assert_close(cb[:, :, :S + n].float(), ca[:, :, :S + n].float(), rtol=rtol, atol=atol)
        assert not cb[:, :, S + n:].any()  # and nothing past them
    if kv_dtype == torch.int8:
        for la, lb in zip(a.tfmr.layers, b.tfmr.layers):
            for sa_, sb_ in ((la.self_attn.kv_cache.k_scale, lb.self_attn.kv_cache.k_scale),
                             (la.self_attn.kv_cache.v_scale, lb.self_attn.kv_cache.v_scale)):
                assert bool((sb_[:, :, S:S + n] > 0).all()) and not sb_[:, :, S + n:].any()
                torch.testing.assert_close(sb_, sa_, rtol=1e-4 if int16 else 1e-5, atol=0)


@pytest.mark.parametrize("fmt,cfg_weight,kv_dtype", [(None, 0.5, None), ("int8-packed", 0.5, torch.bfloat16),
                                                     ("bf16-packed", 0.0, torch.bfloat16),
                                                     ("int8-packed", 0.5, torch.int8)])
def test_fused_generation_gives_the_same_tokens(fmt, cfg_weight, kv_dtype):
    """Whole generations, same noise: identical tokens (batch 2 with CFG, batch 1 without)."""
    model = tiny_t3_as(fmt, kv_dtype)
    batch = 2 if cfg_weight > 0 else 1
    x = torch.randn(batch, 10, model.cfg.dim, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(max_new_tokens=48, min_p=0.0, cfg_weight=cfg_weight)
    step = FusedDecodeStep(model)
    with torch.inference_mode():
        want = generate_tokens(model, x, params, generator=torch.Generator().manual_seed(5))
        got = generate_tokens(model, x, params, generator=torch.Generator().manual_seed(5), step_fn=step)
    assert want.shape[1] >= 2
    assert torch.equal(got, want)


def test_fused_step_refuses_what_it_cannot_run():
    plain = tiny_t3(0)  # q/k/v not fused
    assert "fused" in fused_step_unsupported(plain)
    with pytest.raises(ValueError, match="must be fused"):
        FusedDecodeStep(plain)
    assert "not a T3" in fused_step_unsupported(torch.nn.Linear(2, 2))
    half = tiny_t3(0).to(torch.bfloat16)
    half.fuse_projections()
    assert "fp32 activations" in fused_step_unsupported(half)
    other = tiny_t3_as("int8", None)
    step = FusedDecodeStep(tiny_t3_as("int8", None))
    other.setup_caches(2, 32)
    with pytest.raises(ValueError, match="another T3"):
        step.step_logits(other, torch.tensor([1]), new_state(other, 4, 2, "cpu"), 0)


def test_decode_layers_bad_inputs_give_clear_errors():
    model = tiny_t3_as("int8", None)
    model.setup_caches(2, 16)
    step = FusedDecodeStep(model)
    lay = model.tfmr.layers
    kc = [m.self_attn.kv_cache.k_cache for m in lay]
    vc = [m.self_attn.kv_cache.v_cache for m in lay]
    x = torch.randn(2, model.cfg.dim)
    op = torch.ops.chatterbox_fast.decode_layers
    eps = model.cfg.norm_eps
    with pytest.raises(RuntimeError, match="outside the 16-slot cache"):
        op(x, step.weights, step.scales, step.norms, kc, vc, [], model.rope, torch.tensor([16]), eps)
    with pytest.raises(RuntimeError, match="4 weights, 4 scales"):
        op(x, step.weights[:-1], step.scales, step.norms, kc, vc, [], model.rope, torch.tensor([3]), eps)
    with pytest.raises(RuntimeError, match="int8 weight needs"):
        op(x, step.weights, [torch.empty(0)] * len(step.scales), step.norms, kc, vc, [], model.rope,
           torch.tensor([3]), eps)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        op(x.double(), step.weights, step.scales, step.norms, kc, vc, [], model.rope, torch.tensor([3]), eps)
    with pytest.raises(RuntimeError, match="caches must be contiguous"):
        op(x, step.weights, step.scales, step.norms, kc[:1] + [k.bfloat16() for k in kc[1:]], vc, [], model.rope,
           torch.tensor([3]), eps)
    k8, v8 = [k.to(torch.int8) for k in kc], [v.to(torch.int8) for v in vc]
    with pytest.raises(RuntimeError, match="int8 caches need 2 scale tensors per layer"):
        op(x, step.weights, step.scales, step.norms, k8, v8, [], model.rope, torch.tensor([3]), eps)
    with pytest.raises(RuntimeError, match="cache scales must be contiguous"):
        op(x, step.weights, step.scales, step.norms, k8, v8, [torch.zeros(2, 1, 15)] * (2 * len(kc)), model.rope,
           torch.tensor([3]), eps)
    with pytest.raises(RuntimeError, match="kv_scales are for int8 caches only"):
        op(x, step.weights, step.scales, step.norms, kc, vc, [torch.zeros(1)] * (2 * len(kc)), model.rope,
           torch.tensor([3]), eps)


def test_fused_step_follows_reallocated_caches():
    """The cache tensors are looked up once per allocation (T3.kv_cache_tensors): after release_caches and a
    setup_caches of another size the step writes and reads the new caches, and the released ones are not kept."""
    import weakref

    model = tiny_t3_as("int8", None)
    step = FusedDecodeStep(model)
    x = torch.randn(2, 8, model.cfg.dim, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(max_new_tokens=12, min_p=0.0)
    runs = []
    for max_seq in (32, 64):
        model.setup_caches(2, max_seq)
        old = weakref.ref(model.tfmr.layers[0].self_attn.kv_cache.k_cache)
        with torch.inference_mode():
            runs.append(generate_tokens(model, x, params, generator=torch.Generator().manual_seed(1), step_fn=step))
            want = generate_tokens(model, x, params, generator=torch.Generator().manual_seed(1))
        assert torch.equal(runs[-1], want)
        assert model.kv_cache_tensors()[0][0] is model.tfmr.layers[0].self_attn.kv_cache.k_cache
        model.release_caches()
        assert old() is None  # nothing (the step, the model's lists) keeps a released cache alive
        with pytest.raises(RuntimeError, match="setup_caches"):
            model.kv_cache_tensors()
    assert torch.equal(runs[0], runs[1])
