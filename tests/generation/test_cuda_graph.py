"""CUDA graphs (generation/cuda_graph.py): replaying must give exactly what the eager step gives.

The CUDA tests need a GPU (they skip here, on the CPU CI, saying so) and were run on the lent GPU machine by
benchmarks/gpu_run.sh. Tolerance: tokens identical and fp32 outputs bit-identical (a replay runs the same kernels on
the same addresses as the captured eager call). The CPU tests check the parts that do not need a GPU.
"""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast.generation.cuda_graph import CUDAGraphDecodeStep, GraphedEstimator, graph_estimator
from chatterbox_fast.generation.cuda_graph import ungraph_estimator
from chatterbox_fast.generation.decode import KV_BUCKET, cache_len, generate_tokens, kv_bucket, step_logits
from chatterbox_fast.generation.sampling import SamplingParams
from chatterbox_fast.models.s3gen.encoder import ConformerEncoderConfig
from chatterbox_fast.models.s3gen.estimator import EstimatorConfig
from chatterbox_fast.models.s3gen.flow import FlowConfig, S3GenFlow, cosine_t_span, solve_euler_cfg
from chatterbox_fast.models.t3 import T3

from helpers import tiny_t3

torch.set_grad_enabled(False)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_run.sh)")


def _tiny_t3(device, dtype=torch.float32) -> T3:
    return tiny_t3().to(device=device, dtype=dtype)


def _tiny_flow() -> S3GenFlow:
    cfg = FlowConfig(
        input_size=64,
        encoder=ConformerEncoderConfig(d_model=64, n_heads=2, ffn_dim=128, n_blocks=1, n_up_blocks=1),
        estimator=EstimatorConfig(channels=32, n_blocks=1, num_mid_blocks=1, num_heads=2, head_dim=16,
                                  time_embed_dim=64),
        n_timesteps=3,
    )
    torch.manual_seed(0)
    model = S3GenFlow(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _prefill_x(model, S, device, dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, S, model.cfg.dim, generator=g).to(device=device, dtype=dtype)


def test_cache_len_rounds_up_to_two_buckets_plus_a_spare_one():
    assert cache_len(1) == 3 * KV_BUCKET
    assert cache_len(2 * KV_BUCKET) == 3 * KV_BUCKET
    assert cache_len(2 * KV_BUCKET + 1) == 5 * KV_BUCKET
    for n in (1, 127, 128, 129, 256, 257, 1000):  # no decode bucket up to n positions spans the whole cache
        assert kv_bucket(n, cache_len(n)) < cache_len(n)


def test_graphed_estimator_is_the_plain_one_without_cuda():
    flow = _tiny_flow()
    inner = flow.decoder.estimator
    graph_estimator(flow_holder := type("H", (), {"flow": flow})())
    est = flow.decoder.estimator
    assert isinstance(est, GraphedEstimator) and est.inner is inner
    h = torch.randn(2, 7, 320)
    t_emb = est.embed_time(torch.tensor([0.3, 0.3]))
    assert torch.equal(est.forward_packed(h, t_emb), inner.forward_packed(h, t_emb))
    ungraph_estimator(flow_holder)
    assert flow.decoder.estimator is inner


@pytest.mark.parametrize("T", [37, 64])
def test_padding_to_a_bucket_leaves_the_real_frames_unchanged(T):
    """What GraphedEstimator relies on (checked on CPU): masked padded frames never reach the real ones."""
    est = _tiny_flow().decoder.estimator
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, T, 320, generator=g)
    t_emb = est.embed_time(torch.tensor([0.4, 0.4]))
    want = est.forward_packed(h, t_emb)
    Tp = T + 27
    sh, sm = torch.full((2, Tp, 320), 123.0), torch.empty(2, Tp, 1)
    GraphedEstimator._fill(sh, t_emb.clone(), sm, h, t_emb, None)
    assert torch.equal(sh[:, T:], torch.zeros(2, Tp - T, 320)) and sm[:, T:].abs().sum() == 0
    got = est.forward_packed(sh, t_emb, sm)[:, :T]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_graph_step_matches_eager_tokens(dtype, compiled):
    model = _tiny_t3("cuda", dtype)
    params = SamplingParams(max_new_tokens=300)  # crosses two KV buckets: several graphs
    logits_fn = torch.compile(step_logits, fullgraph=True, dynamic=True) if compiled else None
    step = CUDAGraphDecodeStep(model, logits_fn)
    for S in (40, 90):  # two generations: the step rebinds to a new state
        x = _prefill_x(model, S, "cuda", dtype)
        want = generate_tokens(model, x, params, torch.Generator("cuda").manual_seed(S))
        got = generate_tokens(model, x, params, torch.Generator("cuda").manual_seed(S), step_fn=step)
        assert got.shape == want.shape and int(got.min()) >= 0 and int(got.max()) < model.cfg.speech_vocab_size
        if not compiled:
            assert torch.equal(want, got)
        elif dtype == torch.float32:  # inductor kernels round differently: a near-tie draw can flip, then the
            assert torch.equal(want[:, :10], got[:, :10])  # sequences diverge; the start must agree
    assert len(step.graphs) >= 3


@cuda
def test_graph_step_survives_cache_reallocation():
    model = _tiny_t3("cuda")
    step = CUDAGraphDecodeStep(model)
    params = SamplingParams(max_new_tokens=20)
    x = _prefill_x(model, 30, "cuda", torch.float32)
    a = generate_tokens(model, x, params, torch.Generator("cuda").manual_seed(0), step_fn=step)
    model.setup_caches(2, 4 * KV_BUCKET * 3)  # new cache tensors: the old graphs must not be replayed
    b = generate_tokens(model, x, params, torch.Generator("cuda").manual_seed(0), step_fn=step)
    c = generate_tokens(model, x, params, torch.Generator("cuda").manual_seed(0))
    assert torch.equal(a, b) and torch.equal(b, c)


@cuda
def test_graphed_estimator_matches_eager_solve():
    flow = _tiny_flow().cuda()
    holder = type("H", (), {"flow": flow})()
    est = flow.decoder.estimator
    g = torch.Generator("cuda").manual_seed(0)
    noise, mu, cond = (torch.randn(1, 37, 80, generator=g, device="cuda") for _ in range(3))
    spks = torch.randn(1, 80, generator=g, device="cuda")
    want = solve_euler_cfg(est, noise, mu, spks, cond, None, cosine_t_span(10), 0.7)
    graph_estimator(holder)
    got = solve_euler_cfg(flow.decoder.estimator, noise, mu, spks, cond, None, cosine_t_span(10), 0.7)
    again = solve_euler_cfg(flow.decoder.estimator, noise, mu, spks, cond, None, cosine_t_span(10), 0.7)
    assert flow.decoder.estimator.fallback_reason is None and len(flow.decoder.estimator._graphs) == 1
    assert torch.equal(got, again)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same kernels; cuBLAS may pick another algorithm
    graph_estimator(holder, autocast_dtype=torch.bfloat16)
    low = solve_euler_cfg(flow.decoder.estimator, noise, mu, spks, cond, None, cosine_t_span(10), 0.7)
    rel = ((low - want).norm() / want.norm()).item()
    assert 0 < rel < 5e-2, rel


def test_fused_projections_give_the_same_logits():
    """T3.fuse_projections (used on CUDA): q/k/v and gate/up as single GEMMs, same logits to float rounding."""
    model = _tiny_t3("cpu")
    params = SamplingParams(max_new_tokens=12)
    x = _prefill_x(model, 33, "cpu", torch.float32)
    model.setup_caches(2, 64)
    want_prefill = model.forward_hidden(x, torch.arange(33))
    want = generate_tokens(model, x, params, torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in model.parameters())
    model.fuse_projections()
    assert sum(p.numel() for p in model.parameters()) == n_params  # moved, not copied
    assert not hasattr(model.tfmr.layers[0].self_attn, "q_proj")
    torch.testing.assert_close(model.forward_hidden(x, torch.arange(33)), want_prefill, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate_tokens(model, x, params, torch.Generator().manual_seed(0)), want)
