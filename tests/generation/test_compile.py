"""Compiled T3 decode step (generation/compile.py) on a tiny 2-layer T3: same tokens as eager for the same noise.

Tolerance: tokens must be identical (the draw is argmax(p / E) with the same E; fp32 logits of a compiled graph differ
from eager by ~1e-6, far below the gaps between competing p / E on these random weights); raw logits within 1e-4
abs (fp32, different GEMM kernels and fusion order). Inductor compiles a few graphs here (tens of seconds on two cores
in all); the tests skip, saying why, where torch.compile cannot run (no C++ compiler, unsupported platform).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from chatterbox_fast.config import T3Config
from chatterbox_fast.generation.compile import CompiledStep, compile_decode_step, compile_options
from chatterbox_fast.generation.decode import decode_one_token, generate_tokens, new_state, prefill, step_logits
from chatterbox_fast.generation.sampling import SamplingParams, exponential_noise
from chatterbox_fast.models.t3 import T3

from helpers import skip_unless_compile_works, tiny_t3

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def compile_works():
    skip_unless_compile_works()


@pytest.fixture(scope="module")
def tiny():
    return tiny_t3()


def _x(model, S):
    torch.manual_seed(1)
    return torch.randn(2, S, model.cfg.dim)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_decode_step_has_no_graph_break(tiny):
    tiny.setup_caches(2, 200)
    x = _x(tiny, 50)
    state = new_state(tiny, 50, 2, "cpu")
    prefill(tiny, x)
    noise = exponential_noise((1, tiny.cfg.speech_vocab_size), "cpu")
    with torch.inference_mode():
        ex = torch._dynamo.explain(decode_one_token)(tiny, torch.tensor([5]), state, noise, SamplingParams(), 128)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_frozen_cpp_gemm_matches_eager_without_recompiling(tiny, compile_works):
    """max-autotune C++ GEMM + freezing (logits scope): the weights are frozen into the C++
    micro-GEMM (no plain `mm` left), warm_up compiles every graph, a generation crossing a kv bucket boundary reuses
    them, and the tokens equal eager's. Only the C++ GEMM backend is kept, which skips autotuning (compile time)."""
    S, n = 50, 150  # positions 50..199: kv_len 128, then 200 (= the cache length)
    params = SamplingParams(max_new_tokens=n, min_p=0.0, temperature=1.5)  # flat distributions: many ids in play
    x = _x(tiny, S)
    tiny.setup_caches(2, S + n)
    step = compile_decode_step(tiny, mode="max-autotune-no-cudagraphs", freezing=True,
                               options={"max_autotune_gemm_backends": "CPP"})
    before = _graphs()
    _, code = run_and_get_code(step.warm_up, 2, params)  # (resets dynamo first)
    warmed = _graphs()
    assert step.is_compiled, step.fallback_reason
    assert 1 <= warmed - before <= 2  # dynamic kv_len: a general graph + the full-cache-length one
    code = "\n".join(code)
    assert "micro_gemm" in code and "extern_kernels.mm" not in code, "weights not frozen into the C++ GEMM"
    ours = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(0), step_fn=step)
    ref = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(0))
    assert step.is_compiled, step.fallback_reason
    assert _graphs() == warmed, "generation recompiled after warm_up"
    assert ours.shape == ref.shape == (1, n)
    assert torch.equal(ours, ref), f"first difference at {(ours != ref).nonzero()[:1].tolist()}"
    # a different sampling setting does not recompile in the logits scope
    generate_tokens(tiny, x, SamplingParams(max_new_tokens=20, repetition_penalty=1.7),
                    generator=torch.Generator().manual_seed(1), step_fn=step)
    assert _graphs() == warmed

    # raw logits of the compiled model part vs eager, at a late position
    state = new_state(tiny, S + n - 1, 2, "cpu")
    tok = torch.tensor([7])
    with torch.inference_mode(), step._config():  # (the freezing flag is part of what the graphs were built under)
        got = step._compiled(tiny, tok, state, S + n)
        want = step_logits(tiny, tok, state, S + n)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_default_compiled_step_matches_eager(tiny, compile_works):
    """compile_decode_step's defaults (plain inductor, no freezing, logits scope)."""
    S, n = 30, 110  # crosses the 128 bucket
    params = SamplingParams(max_new_tokens=n)
    x = _x(tiny, S)
    tiny.setup_caches(2, 256)
    step = compile_decode_step(tiny)
    ours = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(5), step_fn=step)
    ref = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(5))
    assert step.is_compiled, step.fallback_reason
    assert torch.equal(ours, ref)


def test_released_kv_cache_comes_back_at_its_size_without_recompiling(tiny, compile_works):
    """The engine frees the KV cache after T3 on CPU (peak RSS); the next generation re-creates it with the same
    shapes, so the warmed-up graphs are reused and the tokens do not change."""
    S, n = 30, 110
    params = SamplingParams(max_new_tokens=n)
    x = _x(tiny, S)
    tiny.setup_caches(2, 256)
    step = compile_decode_step(tiny)
    step.warm_up(2, params)
    warmed = _graphs()
    first = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(5), step_fn=step)
    tiny.release_caches()
    assert not tiny.caches_allocated and tiny.max_seq == 256
    again = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(5), step_fn=step)
    assert tiny.caches_allocated and tiny.max_seq == 256
    assert step.is_compiled, step.fallback_reason
    assert _graphs() == warmed, "re-created cache recompiled the step"
    assert torch.equal(first, again)


def test_step_scope_matches_eager(tiny, compile_works):
    """The whole decode_one_token compiled (processors, draw and state update in the graph)."""
    torch._dynamo.reset()
    S, n = 40, 60
    params = SamplingParams(max_new_tokens=n, min_p=0.02, top_p=0.9)
    x = _x(tiny, S)
    tiny.setup_caches(2, 256)
    step = compile_decode_step(tiny, mode="default", freezing=False, scope="step")
    ours = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(2), step_fn=step)
    ref = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(2))
    assert step.is_compiled, step.fallback_reason
    assert torch.equal(ours, ref)


def test_failed_compile_falls_back_to_eager_once(tiny, caplog):
    tiny.setup_caches(2, 128)
    step = CompiledStep(tiny, mode="eager")
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("C++ compiler not found\nsecond line")

    step._compiled = broken  # stands in for an inductor failure
    x = _x(tiny, 30)
    params = SamplingParams(max_new_tokens=12)
    with caplog.at_level(logging.WARNING, logger="chatterbox_fast.generation.compile"):
        ours = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(0), step_fn=step)
    ref = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, ref)
    assert len(calls) == 1 and not step.is_compiled
    assert step.fallback_reason == "RuntimeError: C++ compiler not found"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using eager" in warnings[0].getMessage()


def test_compiled_step_refuses_tensors_made_outside_inference_mode(tiny):
    """Such tensors fail dynamo's dispatch-key guards: every graph would be compiled (and frozen) again."""
    tiny.setup_caches(2, 128)
    step = CompiledStep(tiny, mode="default", freezing=False)  # lazy: nothing is compiled by this test
    state = new_state(tiny, 10, 2, "cpu")
    noise = torch.ones(1, tiny.cfg.speech_vocab_size)
    with pytest.raises(ValueError, match="inference_mode"):
        step(tiny, torch.tensor([1]), state, noise, SamplingParams(), 128)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_options("fastest", True)
    with pytest.raises(TypeError, match="freezing must be a bool"):
        compile_options("default", 1)
    with pytest.raises(ValueError, match="scope must be one of"):
        CompiledStep(tiny, mode="eager", scope="layer")
    with pytest.raises(TypeError, match="model must be a T3"):
        CompiledStep(torch.nn.Linear(2, 2), mode="eager")
    other = T3(T3Config.tiny())
    step = CompiledStep(tiny, mode="eager")
    with pytest.raises(ValueError, match="another T3 instance"):
        step(other, torch.tensor([1]), None, None, SamplingParams(), 128)
    tiny.setup_caches(2, 64)
    with pytest.raises(ValueError, match="setup_caches"):
        step.warm_up(1)


def test_generation_across_many_kv_buckets_does_not_recompile(tiny, compile_works):
    """A long cache (11 buckets of 128 slots, as the engine's 1408) and a generation crossing three of them: the
    graphs compiled by warm_up serve every step (an int argument of a custom op, e.g. the bucket length passed to
    our CPU decode attention, would specialise the step once per bucket: minutes each on the full model)."""
    S, n = 30, 300  # positions 30..329: kv_len 128, 256, 384
    tiny.setup_caches(2, 1408)
    step = compile_decode_step(tiny)
    step.warm_up(2, SamplingParams())
    warmed = _graphs()
    assert step.is_compiled, step.fallback_reason
    params = SamplingParams(max_new_tokens=n, min_p=0.0)
    x = _x(tiny, S)
    ours = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(0), step_fn=step)
    assert _graphs() == warmed, "generation recompiled after warm_up"
    ref = generate_tokens(tiny, x, params, generator=torch.Generator().manual_seed(0))
    assert ours.shape == ref.shape == (1, n) and torch.equal(ours, ref)
