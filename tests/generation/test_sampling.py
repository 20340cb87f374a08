"""Sampler and logits processors: exact semantics on hand-made logits, deterministic draws with injected noise,
the empirical distribution of draws, and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from chatterbox_fast.generation.sampling import (
    SamplingParams, cfg_combine, exponential_noise, min_p_filter, process_logits, repetition_penalty, sample,
    top_p_filter,
)


def test_cfg_combine():
    logits = torch.tensor([[1.0, 2.0, -1.0], [0.5, 3.0, -2.0]])
    torch.testing.assert_close(cfg_combine(logits, 0.5), torch.tensor([[1.25, 1.5, -0.5]]))
    single = torch.tensor([[1.0, 2.0, -1.0]])
    assert cfg_combine(single, 0.5) is single


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_min_p_keeps_tokens_at_or_above_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = min_p_filter(probs.log(), 0.2)  # threshold 0.1
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()
    assert min_p_filter(probs.log(), 0.0).isfinite().all()


def test_top_p_drops_the_low_tail():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(probs.log(), 0.8)  # ascending cum: .05 .20 .50 1.0 -> remove cum <= .2
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    out = top_p_filter(probs.log(), 0.01)  # always keeps the top id
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, 0])


def test_process_order_matches_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    seen = torch.tensor([[False, True, False, True]])
    p = SamplingParams(temperature=0.5, cfg_weight=1.0, repetition_penalty=2.0, min_p=0.0, top_p=1.0)
    out = process_logits(logits, seen, p)
    c = torch.tensor([3.0, 1.0, -1.0, -3.0])  # c + 1.0 * (c - u)
    c = torch.tensor([3.0, 0.5, -1.0, -6.0])  # penalty on ids 1 and 3
    torch.testing.assert_close(out, (c / 0.5)[None])


def test_injected_noise_draw_is_deterministic():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    noise = torch.tensor([[1.0, 1.0, 1.0]])
    assert sample(probs, noise).item() == 1
    noise = torch.tensor([[0.001, 5.0, 5.0]])  # a tiny exponential makes id 0 win
    assert sample(probs, noise).item() == 0
    noise = torch.tensor([[1e-9, 1.0, 1.0]])  # zero probability never wins
    assert sample(torch.tensor([[0.0, 0.5, 0.5]]), noise).item() != 0


def test_draws_follow_the_distribution():
    """Chi-square goodness of fit on 40k draws (p-value threshold 1e-4: fails only on a real bias)."""
    probs = torch.tensor([[0.05, 0.1, 0.15, 0.2, 0.5, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    noise = exponential_noise((n, 6), "cpu", g)
    draws = sample(probs.expand(n, -1), noise)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[5] == 0
    expected = probs[0, :5].double() * n
    chi2 = (((counts[:5] - expected) ** 2) / expected).sum().item()
    assert chi2 < 23.5, f"chi2={chi2:.1f} (df=4, p=1e-4 critical value 23.5)"
    # and a biased sampler is caught by the same statistic
    biased = ((torch.tensor([0.06, 0.1, 0.15, 0.2, 0.49]).double() * n - expected) ** 2 / expected).sum().item()
    assert biased > 23.5


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"), (dict(cfg_weight=-0.5), "cfg_weight"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(temperature="hot"), "temperature"),
])
def test_bad_parameters_raise_value_error(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)
