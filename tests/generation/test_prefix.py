"""decode.PrefixKV: T3's voice prefix computed once (batch 1, for every CFG row) and restored by later prefills."""

from __future__ import annotations

import copy

import pytest
import torch

from chatterbox_fast.generation.decode import PrefixKV, generate_tokens, prefill
from chatterbox_fast.generation.sampling import SamplingParams

from helpers import tiny_t3

torch.set_grad_enabled(False)


def _x(model, seed=1, cfg_batch=True, text=(255, 10, 11, 12, 2, 13, 0)):
    g = torch.Generator().manual_seed(seed)
    cond = model.cond_embeds(torch.randn(1, 256, generator=g), torch.randint(0, 6561, (1, 20), generator=g),
                             torch.tensor([0.5]))
    return model.prefill_embeds(cond, torch.tensor([list(text)]), cfg_batch=cfg_batch)


def _cache_slots(model, n):
    return [t[:, :, :n].clone() for layer in model.tfmr.layers
            for t in (layer.self_attn.kv_cache.k_cache, layer.self_attn.kv_cache.v_cache)]


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("cfg_batch", [True, False])
def test_prefill_with_prefix_matches_the_full_prefill(kv_dtype, cfg_batch):
    """First use (prefix computed) and later uses (restored) give the full prefill's logits and cache, to fp32
    rounding (the rows after the prefix attend to it through the cache); restored == first use, bit for bit."""
    model = tiny_t3()
    model.kv_dtype = kv_dtype
    x = _x(model, cfg_batch=cfg_batch)
    B, S = x.shape[:2]
    P = S - 10  # the cond without its last (emotion) token: S = cond + 7 text ids + 2 BOS
    model.setup_caches(B, 64)
    full = prefill(model, x)
    full_cache = _cache_slots(model, S)
    pk = PrefixKV(P)
    first = prefill(model, x, pk)
    first_cache = _cache_slots(model, S)
    for layer in model.tfmr.layers:  # scribble over the cache: the restore must rewrite the prefix slots
        layer.self_attn.kv_cache.k_cache.fill_(3)
        layer.self_attn.kv_cache.v_cache.fill_(-3)
    again = prefill(model, x, pk)
    assert torch.equal(first, again)
    assert all(torch.equal(a, b) for a, b in zip(first_cache, _cache_slots(model, S)))
    if kv_dtype is None:
        torch.testing.assert_close(first, full, rtol=1e-5, atol=1e-5)
        for a, b in zip(first_cache, full_cache):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # rounded caches: a slot's fp32 value may round to the neighbouring bf16 / int8 level
        torch.testing.assert_close(first, full, rtol=2e-2, atol=2e-2)


def test_a_different_prefix_is_recomputed_not_reused():
    model = tiny_t3()
    x1, x2 = _x(model, seed=1), _x(model, seed=2)
    P = x1.shape[1] - 10
    model.setup_caches(2, 64)
    pk = PrefixKV(P)
    prefill(model, x1, pk)
    got = prefill(model, x2, pk)  # another voice through the same holder: recomputed
    ref = copy.deepcopy(model)
    torch.testing.assert_close(got, prefill(ref, x2), rtol=1e-5, atol=1e-5)
    assert torch.equal(pk.embeds, x2[0, :P])


def test_generation_with_a_prefix_matches_and_repeats():
    model = tiny_t3()
    x = _x(model)
    p = SamplingParams(max_new_tokens=40)
    pk = PrefixKV(x.shape[1] - 10)
    plain = generate_tokens(model, x, p, generator=torch.Generator().manual_seed(3))
    first = generate_tokens(model, x, p, generator=torch.Generator().manual_seed(3), prefix=pk)
    again = generate_tokens(model, x, p, generator=torch.Generator().manual_seed(3), prefix=pk)
    assert torch.equal(first, again)
    assert torch.equal(first, plain)  # logits within ~1e-6 of each other: the same draws on this model


def test_bad_prefix_use_is_refused():
    model = tiny_t3()
    x = _x(model)
    model.setup_caches(2, 64)
    with pytest.raises(ValueError, match="length must be >= 1"):
        PrefixKV(0)
    with pytest.raises(ValueError, match="must extend past the prefix"):
        prefill(model, x, PrefixKV(x.shape[1]))
    bad = x.clone()
    bad[1, 0] += 1  # the rows no longer share the first position
    with pytest.raises(ValueError, match="do not share the prefix"):
        prefill(model, bad, PrefixKV(4))
