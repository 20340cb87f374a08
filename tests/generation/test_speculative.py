"""Speculative decoding (generation/speculative.py) and the k-token fused step it verifies with.

Both are checked for *bit* equality, not a tolerance: the k-token `decode_layers` computes every row with the same
kernels and the same per-row summation order as the one-token step (the multi-row linear tile accumulates each
(row, channel) exactly as the pair kernel does), so the speculative decoder's tokens and the generator state it
leaves are those of the plain fused loop, whatever the draft proposes.
"""

from __future__ import annotations


import pytest
import torch

from chatterbox_fast import kernels
from chatterbox_fast.constants import STOP_SPEECH
from chatterbox_fast.generation.decode import generate_tokens, new_state, prefill
from chatterbox_fast.generation.fused import FusedDecodeStep
from chatterbox_fast.generation.kv_cache import quantize_rows_int8
from chatterbox_fast.generation.sampling import SamplingParams
from chatterbox_fast.generation.speculative import (DraftLength, NoiseStream, SpeculativeDecoder,
                                                    build_int8_draft, check_draft_tokens)
from chatterbox_fast.quantize import quantize_t3

from helpers import kv_caches, require_cpu_kernels, tiny_t3, tiny_t3_as

torch.set_grad_enabled(False)


@pytest.fixture(scope="module", autouse=True)
def ops():
    require_cpu_kernels()


def _fp32_model(seed: int = 0, stop_boost: float = 0.0):
    m = tiny_t3(seed)
    m.fuse_projections()
    if stop_boost:  # make EOS likely enough to end generations mid-round
        m.speech_head.weight[STOP_SPEECH] *= stop_boost
    return m


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("fmt", [None, "int8", "int8-packed", "bf16", "bf16-packed"])
@pytest.mark.parametrize("batch, k", [(2, 3), (2, 7), (1, 5)])
def test_k_token_step_equals_k_one_token_steps_bitwise(fmt, kv_dtype, batch, k):
    """tokens_logits over k tokens == k one-token steps: logits and every KV cache slot, bit for bit (2 k rows go
    through 6-row tiles and a remainder tile)."""
    import copy

    a = tiny_t3_as(fmt, kv_dtype)
    b = copy.deepcopy(a)
    S = 9
    x = torch.randn(batch, S, a.cfg.dim, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([(i * 1231 + 17) % 6561 for i in range(k)])
    with torch.inference_mode():
        for m in (a, b):
            m.setup_caches(batch, 32)
            prefill(m, x)
        sa, sb = new_state(a, S, batch, "cpu"), new_state(b, S, batch, "cpu")
        step_a, step_b = FusedDecodeStep(a), FusedDecodeStep(b)
        one = []
        for i in range(k):
            one.append(step_a.step_logits(a, tokens[i:i + 1], sa, 0))
            sa.input_pos += 1
            sa.speech_pos += 1
        got = step_b.tokens_logits(b, tokens, sb)
    assert got.shape == (batch, k, a.cfg.speech_vocab_size)
    assert torch.equal(got, torch.stack(one, dim=1))
    assert int(sb.input_pos) == S  # not advanced
    for ca, cb in zip(kv_caches(a), kv_caches(b)):
        assert torch.equal(ca, cb)


@pytest.mark.parametrize("cfg_weight", [0.5, 0.0])
@pytest.mark.parametrize("draft_tokens", [1, 2, 5, 9])
def test_speculative_tokens_and_generator_equal_the_plain_fused_loop(cfg_weight, draft_tokens):
    m = _fp32_model()
    dec = SpeculativeDecoder(m, draft_tokens=draft_tokens, adaptive=False)
    B = 2 if cfg_weight > 0 else 1
    x = torch.randn(B, 11, m.cfg.dim, generator=torch.Generator().manual_seed(2))
    for temperature, n in ((0.8, 40), (1.5, 23)):
        p = SamplingParams(max_new_tokens=n, temperature=temperature, cfg_weight=cfg_weight)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        want = generate_tokens(m, x, p, generator=g1, step_fn=dec.target_step)
        got = dec.generate(x, p, generator=g2)
        stats = dec.last_stats
        assert torch.equal(got, want)
        assert torch.equal(g1.get_state(), g2.get_state())  # the flow's noise comes next
        assert stats["tokens"] == got.shape[1]
        if draft_tokens > 1:
            assert stats["accepted"] > 0.5 * stats["drafted"]  # the int8 draft mostly agrees (random tiny model)
        else:
            assert stats["drafted"] == 0


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
def test_speculative_with_a_bf16_weight_target_equals_its_plain_loop(kv_dtype):
    """use_mixed_precision on a CPU: T3's layer weights in bf16 (packed, as the engine lays them out); the int8
    draft is built from those bf16 values and the check computes every row as the bf16 one-token step does."""
    from chatterbox_fast.quantize import Int8Linear

    m = tiny_t3_as("bf16-packed", kv_dtype)
    dec = SpeculativeDecoder(m, draft_tokens=6, adaptive=False)
    lin = dec.draft.tfmr.layers[0].mlp.down_proj
    assert isinstance(lin, Int8Linear)
    want_w = m.tfmr.layers[0].mlp.down_proj.row_major_weight().float()
    assert (lin.dequantized_weight() - want_w).abs().max() <= lin.scale.max() / 2 + 1e-6  # int8 of the bf16 values
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(max_new_tokens=50)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want = generate_tokens(m, x, p, generator=g1, step_fn=dec.target_step)
    got = dec.generate(x, p, generator=g2)
    assert torch.equal(got, want) and torch.equal(g1.get_state(), g2.get_state())
    assert dec.last_stats["accepted"] > 0.5 * dec.last_stats["drafted"] > 0


def _spoil_draft(dec: SpeculativeDecoder) -> None:
    """A draft that never agrees: each of its tokens shifted by one id."""
    step = dec.draft_step
    dec.draft_step = lambda *args: (step(*args) + 1) % STOP_SPEECH


@pytest.mark.parametrize("spoil", [False, True])
@pytest.mark.parametrize("adaptive", [True, False])
def test_the_draft_and_the_round_length_change_the_speed_not_the_tokens(adaptive, spoil):
    # adaptive: the k of each round comes from the measured times of this tiny model (any k is exact)
    m = _fp32_model()
    dec = SpeculativeDecoder(m, draft_tokens=6, adaptive=adaptive)
    if spoil:
        _spoil_draft(dec)
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(max_new_tokens=120)
    for seed in (3, 4):  # the second generation starts from the first's round-length statistics
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = generate_tokens(m, x, p, generator=g1, step_fn=dec.target_step)
        got = dec.generate(x, p, generator=g2)
        assert torch.equal(got, want) and torch.equal(g1.get_state(), g2.get_state())
        st = dec.last_stats
        assert sum(st["k_rounds"].values()) == st["rounds"] and max(st["k_rounds"]) <= 6
        assert st["drafted"] == sum((k - 1) * c for k, c in st["k_rounds"].items())
        if not adaptive:
            assert st["k_rounds"].get(6, 0) >= 0.8 * st["rounds"]  # the last few shortened to the tokens left
            if spoil:
                assert st["accepted"] < 0.1 * st["drafted"]
            else:
                assert st["accepted"] > 0.5 * st["drafted"]


def test_the_draft_catches_up_on_the_slots_of_plain_rounds():
    m = _fp32_model()
    dec = SpeculativeDecoder(m, draft_tokens=4)
    ks = iter([1, 1, 1, 4, 1, 3] + [1] * 100)
    dec.lengths.choose = lambda remaining: min(next(ks), remaining)  # plain rounds, then drafting ones
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(max_new_tokens=9)
    want = generate_tokens(m, x, p, generator=torch.Generator().manual_seed(1), step_fn=dec.target_step)
    got = dec.generate(x, p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)
    # slots 11 .. 13 were fed by plain rounds only: the draft got the target's (rounded to its int8 cache rows)
    # before its first round
    for tl, dl in zip(m.tfmr.layers, dec.draft.tfmr.layers):
        tk, dc = tl.self_attn.kv_cache.k_cache, dl.self_attn.kv_cache
        q, scale = quantize_rows_int8(tk[:, :, 11:14])
        assert torch.equal(dc.k_cache[:, :, 11:14], q) and torch.equal(dc.k_scale[:, :, 11:14], scale)
        assert dc.k_cache[:, :, 11:14].abs().sum() > 0


def test_the_draft_cache_holds_every_emitted_position():
    # every slot the draft attends over holds the K of the token emitted there: its own (int8 weights) or, for
    # positions it never fed (plain rounds, the last proposal of a fully agreeing round), the target's
    m = _fp32_model()
    dec = SpeculativeDecoder(m, draft_tokens=5, adaptive=False)
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(7))
    for seed in range(3):  # (this draft agrees often: rounds that agree all the way happen; without the catch-up
        # of their last slot this test fails)
        got = dec.generate(x, SamplingParams(max_new_tokens=60), generator=torch.Generator().manual_seed(seed))
        end = 11 + got.shape[1] - 5  # the last round's slots may not be filled yet (the next drafting round does)
        for tl, dl in zip(m.tfmr.layers, dec.draft.tfmr.layers):
            tk = tl.self_attn.kv_cache.k_cache[:, :, :end].float()
            dk = dl.self_attn.kv_cache.read(end, torch.float32)[0]  # dequantised
            err = (dk - tk).norm(dim=-1) / tk.norm(dim=-1)  # (B, H, end)
            assert err.max() < 0.1, (seed, err.max())


def _probe_gaps(d: DraftLength, rounds: int, hits: int, draft_s: float, check_s: float) -> list[int]:
    """Run `rounds` rounds in which every probe (k = 2) checks one proposal with `hits` agreeing and plain rounds
    cost 0.1 s; return the numbers of plain rounds between probes."""
    gaps, plain = [], 0
    for _ in range(rounds):
        k = d.choose(100)
        assert k in (1, 2)
        if k == 2:
            gaps.append(plain)
            plain = 0
            d.update(2, trials=1, hits=hits, draft_s=draft_s, check_s=check_s)
        else:
            plain += 1
            d.update(1, trials=0, hits=0, draft_s=None, check_s=0.1)
    return gaps


class TestDraftLength:
    def test_prior_only_picks_a_short_round(self):
        # agreement 0.8 and the default costs (draft 0.45, check 1 + 0.2 (k - 1)): k = 2 has the best rate (1.091
        # tokens per one-token check), k = 3 is within 3 % of it (1.061) and is taken, k = 4 is not (1.001)
        assert DraftLength(8).choose(100) == 3
        assert DraftLength(8, tie=0.0).choose(100) == 2

    def test_near_equal_rates_take_the_longest_round(self):
        d = DraftLength(8)
        for k in (2, 8, 2, 8):  # agreeing draft, costly draft steps: k = 6 is best, 8 within 1 % of it
            d.update(k, trials=k - 1, hits=k - 1, draft_s=0.05 * (k - 1), check_s=0.1 + 0.01 * k)
        rate = {k: sum(d.agreement() ** i for i in range(k)) / ((k - 1) * d.t_draft + d.check_cost(k))
                for k in range(1, 9)}
        best = max(rate, key=rate.get)
        assert best < 8 and rate[8] >= 0.97 * rate[best]  # the setting this test is about
        assert d.choose(100) == 8
        assert DraftLength(8, tie=0.0).choose(100) == 2  # (fresh: the prior's choice without the tie rule)

    def test_a_draft_that_never_agrees_turns_speculation_off(self):
        d = DraftLength(6)
        for _ in range(20):
            d.update(2, trials=1, hits=0, draft_s=0.04, check_s=0.1)
        assert d.agreement() < 0.25
        assert d.choose(100) == 1

    def test_a_cheap_draft_that_always_agrees_gets_the_longest_round(self):
        d = DraftLength(8)
        for k in (2, 8, 2, 8):
            d.update(k, trials=k - 1, hits=k - 1, draft_s=0.001 * (k - 1), check_s=0.1 + 0.001 * k)
        assert d.choose(100) == 8
        assert d.choose(3) == 3  # never past the tokens left
        assert d.choose(1) == 1

    def test_an_expensive_check_shortens_rounds(self):
        d = DraftLength(8)
        for k in (2, 6, 2, 6):  # checking costs a full step per extra token: drafting cannot pay
            d.update(k, trials=k - 1, hits=k - 1, draft_s=0.05 * (k - 1), check_s=0.1 * k)
        assert d.check_cost(4) == pytest.approx(0.4)
        assert d.choose(100) == 1

    def test_probes_back_off_while_the_draft_stays_poor(self):
        d = DraftLength(6, probe_every=4, max_probe_every=16)
        d.update(2, trials=30, hits=0, draft_s=0.04, check_s=0.1)
        gaps = _probe_gaps(d, 80, hits=0, draft_s=0.04, check_s=0.11)
        assert gaps[:3] == [4, 8, 16] and set(gaps[3:]) <= {16}

    def test_probes_keep_coming_when_only_the_costs_said_no(self):
        d = DraftLength(6, probe_every=4, max_probe_every=64)
        for _ in range(30):  # the draft agrees, but drafting costs as much as a step: k = 1
            d.update(2, trials=1, hits=1, draft_s=0.1, check_s=0.2)
            d.update(1, trials=0, hits=0, draft_s=None, check_s=0.1)
        gaps = _probe_gaps(d, 40, hits=1, draft_s=0.1, check_s=0.2)
        assert len(gaps) >= 6 and set(gaps[1:]) == {4}  # the machine may get cheaper for the draft: keep looking

    def test_one_slow_early_draft_step_costs_a_few_plain_rounds_only(self):
        """A shared machine's hiccup in the first measured round (a draft step 3x its cost) turns drafting off, but
        the next probe (after 4 plain rounds by default) measures the real cost, which replaces the slow one."""
        d = DraftLength(6)
        d.update(3, trials=2, hits=2, draft_s=2 * 0.075, check_s=0.09)  # draft steps of 75 ms (25 ms really)
        d.update(6, trials=5, hits=5, draft_s=5 * 0.075, check_s=0.15)
        plain = 0
        while (k := d.choose(100)) == 1:
            plain += 1
            d.update(1, trials=0, hits=0, draft_s=None, check_s=0.065)
        assert k == 2 and plain == 4  # the probe
        d.update(2, trials=1, hits=1, draft_s=0.025, check_s=0.075)
        assert d.t_draft == pytest.approx(0.025)
        assert d.choose(100) >= 5
        d.update(6, trials=5, hits=5, draft_s=5 * 0.05, check_s=0.3)  # a slower spell is followed, by ema
        assert d.t_draft == pytest.approx(0.7 * 0.025 + 0.3 * 0.05) and d.t_check[6] == pytest.approx(0.195)

    def test_a_probe_that_finds_agreement_resumes_drafting(self):
        d = DraftLength(6, probe_every=4)
        d.update(2, trials=10, hits=0, draft_s=0.04, check_s=0.1)
        while d.choose(100) == 1:
            d.update(1, trials=0, hits=0, draft_s=None, check_s=0.1)
        for _ in range(10):  # the probe and the rounds after it agree
            d.update(2, trials=1, hits=1, draft_s=0.04, check_s=0.11)
        assert d.choose(100) > 1 and d.probe_every == 4


def test_speculative_stops_at_eos_mid_round_like_the_plain_loop():
    m = _fp32_model(stop_boost=8.0)
    dec = SpeculativeDecoder(m, draft_tokens=6, adaptive=False)
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(max_new_tokens=80)
    ended = 0
    for seed in range(6):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = generate_tokens(m, x, p, generator=g1, step_fn=dec.target_step)
        got = dec.generate(x, p, generator=g2)
        assert torch.equal(got, want)
        assert torch.equal(g1.get_state(), g2.get_state())
        ended += int(want[0, -1] == STOP_SPEECH and want.shape[1] < 80)
    assert ended >= 2  # the boost did make EOS happen


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_speculative_respects_max_new_tokens(n):
    m = _fp32_model()
    dec = SpeculativeDecoder(m, draft_tokens=4, adaptive=False)
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(4))
    p = SamplingParams(max_new_tokens=n)
    want = generate_tokens(m, x, p, generator=torch.Generator().manual_seed(1), step_fn=dec.target_step)
    got = dec.generate(x, p, generator=torch.Generator().manual_seed(1))
    assert got.shape[1] <= n and torch.equal(got, want)


def test_speculative_with_the_global_generator():
    m = _fp32_model()
    dec = SpeculativeDecoder(m, draft_tokens=5)
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(6))
    p = SamplingParams(max_new_tokens=30)
    torch.manual_seed(9)
    want = generate_tokens(m, x, p, step_fn=dec.target_step)
    after = torch.get_rng_state()
    torch.manual_seed(9)
    got = dec.generate(x, p)
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), after)


def test_noise_stream_draws_in_order_and_rewinds():
    g = torch.Generator().manual_seed(3)
    s = NoiseStream(7, torch.device("cpu"), g)
    ahead = [s.get(i).clone() for i in range(5)]
    assert torch.equal(s.get(2), ahead[2])  # drawn once, then kept
    s.finish(2)
    ref = torch.Generator().manual_seed(3)
    for i in range(2):
        assert torch.equal(torch.empty(1, 7).exponential_(1.0, generator=ref), ahead[i])
    assert torch.equal(g.get_state(), ref.get_state())


def test_draft_shares_everything_but_int8_layer_linears_and_head():
    from chatterbox_fast.quantize import Int8Linear

    m = _fp32_model()
    d = build_int8_draft(m)
    assert d.speech_emb is m.speech_emb and d.tfmr.norm is m.tfmr.norm and d.text_head is m.text_head
    assert isinstance(d.speech_head, Int8Linear) and d.speech_head.out_features == m.speech_head.out_features
    x = torch.randn(2, m.cfg.dim)
    ref = m.speech_head(x)
    assert (d.speech_logits(x) - ref).abs().max() < 0.02 * ref.abs().max()  # int8's error, not another head
    for ld, lm in zip(d.tfmr.layers, m.tfmr.layers):
        assert ld.input_layernorm is lm.input_layernorm
        for mod in (ld.self_attn.qkv_proj, ld.self_attn.o_proj, ld.mlp.gate_up_proj, ld.mlp.down_proj):
            assert isinstance(mod, Int8Linear) and mod.packed
    assert not any(t.is_meta for t in list(d.parameters()) + list(d.buffers()))
    assert d.kv_dtype == torch.int8


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="draft_tokens"):
        check_draft_tokens(0)
    with pytest.raises(ValueError, match="draft_tokens"):
        check_draft_tokens(True)
    m = tiny_t3(0)
    with pytest.raises(ValueError, match="fuse"):
        build_int8_draft(m)
    q = tiny_t3(0)
    quantize_t3(q, "int8")
    with pytest.raises(ValueError, match="fp32 nn.Linear or Bf16Linear"):
        build_int8_draft(q)
    with pytest.raises(ValueError, match="draft_tokens"):
        SpeculativeDecoder(_fp32_model(), draft_tokens=100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_copy_kv_slots_writes_what_kv_cache_update_writes(dtype):
    """The C++ catch-up copy (one call for every layer) == KVCache.update per layer, bit for bit, slots outside
    [start, stop) untouched; bad arguments are refused clearly."""
    from chatterbox_fast.generation.kv_cache import KVCache

    g = torch.Generator().manual_seed(0)
    src = [KVCache(2, 3, 12, 16, torch.float32) for _ in range(2)]
    for c in src:
        c.k_cache.normal_(generator=g)
        c.v_cache.normal_(generator=g)
    a = [KVCache(2, 3, 14, 16, dtype) for _ in range(2)]
    b = [KVCache(2, 3, 14, 16, dtype) for _ in range(2)]
    pos = torch.arange(4, 9)
    for s, d in zip(src, a):
        d.update(pos, s.k_cache[:, :, 4:9], s.v_cache[:, :, 4:9])
    scales = [t for d in b for t in (d.k_scale, d.v_scale)] if dtype == torch.int8 else []
    torch.ops.chatterbox_fast.copy_kv_slots([s.k_cache for s in src], [s.v_cache for s in src],
                                            [d.k_cache for d in b], [d.v_cache for d in b], scales, 4, 9)
    for x, y in zip(a, b):
        for name in ("k_cache", "v_cache") + (("k_scale", "v_scale") if dtype == torch.int8 else ()):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert y.k_cache[:, :, 4:9].abs().sum() > 0 and y.k_cache[:, :, :4].abs().sum() == 0
    with pytest.raises(RuntimeError, match="outside the caches"):
        torch.ops.chatterbox_fast.copy_kv_slots([s.k_cache for s in src], [s.v_cache for s in src],
                                                [d.k_cache for d in b], [d.v_cache for d in b], scales, 4, 13)
    if dtype == torch.int8:
        with pytest.raises(RuntimeError, match="2 scale tensors per layer"):
            torch.ops.chatterbox_fast.copy_kv_slots([s.k_cache for s in src], [s.v_cache for s in src],
                                                    [d.k_cache for d in b], [d.v_cache for d in b], [], 4, 9)


class _PoisonedTorch:
    """torch, except that `empty` returns NaN-filled (float) or 0x7f-filled (int) tensors: what uninitialised
    memory may hold. A reader of a slot never written then sees NaN (int8 cache: a NaN scale)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, dtype=None, device=None):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if t.is_floating_point() else 127)


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_uninitialised_caches_never_read(monkeypatch, kv_dtype):
    """The fused step and the speculative decoder allocate their KV caches without zeroing (ensure_caches(...,
    zero=False)): with that memory full of NaN they give the tokens of a run on zeroed caches, so no unwritten slot
    is ever read. The module path (masked attention over whole buckets) then gets a zeroed cache again."""
    from chatterbox_fast.generation import kv_cache

    m = _fp32_model()
    m.kv_dtype = kv_dtype
    x = torch.randn(2, 11, m.cfg.dim, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(max_new_tokens=45)
    step = FusedDecodeStep(m)
    m.setup_caches(2, 256)  # zeroed
    want = generate_tokens(m, x, p, generator=torch.Generator().manual_seed(3), step_fn=step)
    m.release_caches()
    monkeypatch.setattr(kv_cache, "torch", _PoisonedTorch())
    got = generate_tokens(m, x, p, generator=torch.Generator().manual_seed(3), step_fn=step)
    assert not m.caches_zeroed and torch.isnan(m.tfmr.layers[0].self_attn.kv_cache.v_scale if kv_dtype
                                               else m.tfmr.layers[0].self_attn.kv_cache.v_cache).any()
    assert torch.equal(got, want)
    dec = SpeculativeDecoder(m, draft_tokens=5, adaptive=False)
    m.release_caches()
    spec = dec.generate(x, p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(spec, want) and not dec.draft.caches_zeroed and dec.last_stats["accepted"] > 0
    generate_tokens(m, x, SamplingParams(max_new_tokens=3))  # the module path: zeros again
    assert m.caches_zeroed
