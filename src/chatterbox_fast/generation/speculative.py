"""Exact speculative decoding of T3 on the CPU: an int8 draft proposes, the fp32 model decides (opt-in).

T3's fp32 decode step reads 2 GB of weights per token, so on a CPU it is bound by memory bandwidth; the same weights
applied to k tokens at once cost little more than to one. Here a draft (T3 with int8 copies of the layer linears,
a quarter of the bytes, everything else shared) proposes k - 1 tokens one by one, and the fp32 model computes its
logits for all k positions (the last emitted token and the proposals) in one pass over its weights. The draw is
the sampler's exponential race (argmax p / E, sampling.sample) and both models race with the *same* noise E of
each step, drawn from the caller's generator in the plain loop's order (`NoiseStream`), so the draft usually
proposes exactly the token the fp32 model then draws: their distributions are close (int8 weights: total
variation ~0.016 on random weights), and coupled this way they rarely disagree.

Every emitted token is the fp32 model's own draw from its own processed logits with the noise of its step, so the
output is the plain loop's output: bit for bit, since the k-token verification (`FusedDecodeStep.tokens_logits`)
computes each row exactly as the one-token step does (the same kernels, the same summation order per row). A
disagreement only ends the round early: the fp32 token of that position is emitted and the rest of the draft
discarded (both KV caches are overwritten from there on). Not a sampling approximation (no acceptance ratio, no
residual distribution): the tokens do not depend on the draft at all, only the speed does. The generator is left
where the plain loop leaves it (the flow's noise comes next).

How many tokens a round checks is chosen per round (`DraftLength`, on by default): from the draft's running
agreement and the measured costs of a draft step and of checking k tokens, the k whose expected tokens per second
is highest, down to k = 1 (no draft: a plain step) when the draft agrees too rarely to pay. Long rounds cost more
than they return unless the draft almost always agrees (checking k tokens is ~1 + 0.2 (k - 1) one-token steps on
the 2-core machine measured), and the draft's agreement on the released weights is unknown here: the choice keeps
speculation from ever costing much more than the plain loop. The output never depends on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from .. import kernels as cpu_kernels
from ..constants import STOP_SPEECH
from ..models.t3 import T3
from . import decode
from .decode import choose, ensure_caches, new_state
from .fused import FusedDecodeStep, fused_step_unsupported
from .sampling import SamplingParams, exponential_noise

DEFAULT_DRAFT_TOKENS = 6  # k: tokens verified per round, k - 1 of them proposed by the draft (BENCHMARKS.md)
MAX_DRAFT_TOKENS = 32


def check_draft_tokens(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
    return k


def _int8_copy(lin: torch.nn.Module):
    """quantize.Int8Linear of a target layer linear: a float nn.Linear, or a Bf16Linear (from its bf16 values)."""
    from ..quantize import Bf16Linear, Int8Linear

    if isinstance(lin, Bf16Linear):
        with torch.device("meta"):
            tmp = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        tmp.weight = torch.nn.Parameter(lin.row_major_weight().float(), requires_grad=False)  # one layer's temporary
        return Int8Linear.from_linear(tmp)
    return Int8Linear.from_linear(lin)


def target_linears_supported(target: T3) -> str | None:
    """None when `target`'s layer linears can be drafted and checked (fused fp32 nn.Linear, or Bf16Linear: the
    weight-only bf16 of use_mixed_precision on a CPU), else the reason."""
    from ..quantize import Bf16Linear

    for layer in target.tfmr.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            return "fuse the target's projections first (T3.fuse_projections)"
        for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if not (type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 or isinstance(m, Bf16Linear)):
                return (f"the target's layer linears must be fp32 nn.Linear or Bf16Linear (bf16 weights), got "
                        f"{type(m).__name__}")
    return None


def build_int8_draft(target: T3) -> T3:
    """A T3 whose layer linears and speech head are int8 copies (quantize.Int8Linear) of `target`'s fused fp32 (or
    bf16-weight) ones and whose embeddings, norms and text head are `target`'s own modules (shared, not copied):
    ~0.5 GB on top of the target."""
    from ..quantize import pack_t3

    reason = target_linears_supported(target)
    if reason is not None:
        raise ValueError(f"build_int8_draft: {reason}")
    with torch.device("meta"):
        draft = T3(target.cfg)  # nothing allocated: every tensor below is the target's or a new int8 one
    for name in ("cond_enc", "text_emb", "speech_emb", "text_pos_emb", "speech_pos_emb", "text_head"):
        setattr(draft, name, getattr(target, name))
    # the speech head read at every draft step: an int8 copy (8 MB instead of 33 MB; its logits only steer)
    draft.speech_head = _int8_copy(target.speech_head)
    draft.tfmr.embed_tokens, draft.tfmr.norm = target.tfmr.embed_tokens, target.tfmr.norm
    with torch.no_grad():
        for d, t in zip(draft.tfmr.layers, target.tfmr.layers):
            d.input_layernorm, d.post_attention_layernorm = t.input_layernorm, t.post_attention_layernorm
            da, ta, dm, tm = d.self_attn, t.self_attn, d.mlp, t.mlp
            del da.q_proj, da.k_proj, da.v_proj, dm.gate_proj, dm.up_proj
            da.qkv_proj, da.o_proj = _int8_copy(ta.qkv_proj), _int8_copy(ta.o_proj)
            dm.gate_up_proj, dm.down_proj = _int8_copy(tm.gate_up_proj), _int8_copy(tm.down_proj)
    pack_t3(draft)
    # the draft's cache: int8 rows with a scale each, a quarter of fp32's bytes (its numbers only steer, never
    # emit): late in a generation the cache is a large share of a draft step's bytes (at position 450 the step
    # 22.7 ms against 25.4 with a bf16 cache, medians of 80; agreement unchanged, BENCHMARKS.md session 17)
    draft.kv_dtype = torch.int8
    return draft


class DraftLength:
    """Each round's k (tokens checked; k - 1 drafted), the one with the most expected tokens per unit of cost.

    The draft's agreement is modelled per position: proposal i survives with probability a, independently, so
    checking k tokens emits E(k) = 1 + a + ... + a^(k-1) of them on average. `a` is the decayed share of agreeing
    proposals (each checked proposal is one trial; a `prior` worth `prior_weight` trials starts it). A round costs
    (k - 1) draft steps plus one k-token check: the draft step's time is a running mean of the measured ones, the
    check's a line fitted through the running means of the measured k (with `verify_slope` one-token checks per
    extra token until two k have been measured; `draft_cost` one-token checks per draft step until one was). The
    running means follow a lower measurement at once and a higher one by `ema` (a shared machine only ever makes a
    call slower than its cost: one slow early step must not stop drafting for long). After `probe_every` rounds of
    k = 1 in a row, one round with k = 2 measures the draft and the costs again (with an agreeing draft a k = 2
    round costs about what it saves, so probing often is cheap); while such probes find the draft agreeing less than
    half the time, the interval doubles (up to `max_probe_every`). Rates within `tie` (3 %) of the best count as
    equal and the longest such round is taken (`_best`).
    """

    def __init__(self, k_max: int, prior: float = 0.8, prior_weight: float = 4.0, decay: float = 0.95,
                 draft_cost: float = 0.45, verify_slope: float = 0.2, probe_every: int = 4,
                 max_probe_every: int = 256, ema: float = 0.3, tie: float = 0.03):
        self.k_max = check_draft_tokens(k_max)
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.draft_cost, self.verify_slope, self.ema = draft_cost, verify_slope, ema
        self.tie = tie  # _best: rates within this fraction of the best count as equal (the longest round wins)
        self.probe_every = self.min_probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.hits = self.trials = 0.0
        self.t_draft: float | None = None  # seconds per draft step
        self.t_check: dict[int, float] = {}  # k -> seconds per k-token check
        self.plain_rounds = 0
        self.probing = False

    def agreement(self) -> float:
        return (self.hits + self.prior * self.prior_weight) / (self.trials + self.prior_weight)

    def check_cost(self, k: int) -> float:
        """Seconds (or, before any measurement, one-token checks) to check k tokens."""
        pts = sorted(self.t_check.items())
        if len(pts) >= 2:  # least squares through the measured means
            n = len(pts)
            mk = sum(p[0] for p in pts) / n
            mt = sum(p[1] for p in pts) / n
            var = sum((p[0] - mk) ** 2 for p in pts)
            slope = max(0.0, sum((p[0] - mk) * (p[1] - mt) for p in pts) / var)
            return max(mt + slope * (k - mk), 1e-9)
        if pts:
            k0, t0 = pts[0]
            return t0 * (1 + self.verify_slope * (k - 1)) / (1 + self.verify_slope * (k0 - 1))
        return 1 + self.verify_slope * (k - 1)

    def choose(self, remaining: int) -> int:
        k_top = max(1, min(self.k_max, remaining))
        if k_top == 1:
            return 1
        if self.plain_rounds >= self.probe_every:
            self.probing = True
            return 2
        k = self._best(k_top)
        if self.probing:  # the first choice after a probe: back off only while the draft agrees badly (if it
            self.probing = False  # agrees and only the measured costs said k = 1, those may change: keep probing)
            poor = k == 1 and self.agreement() < 0.5
            self.probe_every = min(2 * self.probe_every, self.max_probe_every) if poor else self.min_probe_every
        return k

    def _best(self, k_top: int) -> int:
        """The k with the highest expected rate; among those within `tie` of it, the largest. The rate is flat near
        its top when the draft agrees often (k = 5..8 within a few %), while the costs it is computed from are
        single timings on a machine whose speed moves by tens of % between rounds: the largest near-best k keeps
        that noise from settling on short rounds, whose loss grows fast below the top."""
        a = self.agreement()
        t_draft = self.t_draft if self.t_draft is not None else self.draft_cost * self.check_cost(1)
        rates = []
        expected = 0.0
        for k in range(1, k_top + 1):
            expected += a ** (k - 1)  # E(k)
            rates.append(expected / ((k - 1) * t_draft + self.check_cost(k)))
        top = max(rates)
        return max(k for k, r in enumerate(rates, start=1) if r >= top * (1 - self.tie))

    def update(self, k: int, trials: int, hits: int, draft_s: float | None, check_s: float) -> None:
        """After a round of k: `trials` proposals checked, `hits` of them agreed; the draft's total time (None
        without a draft) and the check's."""
        if trials:  # plain rounds keep the estimate (probes refresh it)
            self.hits = self.hits * self.decay + hits
            self.trials = self.trials * self.decay + trials
        self.plain_rounds = self.plain_rounds + 1 if k == 1 else 0  # a probe (k = 2) restarts the count
        if draft_s is not None and k > 1:
            self.t_draft = self._follow(self.t_draft, draft_s / (k - 1))
        self.t_check[k] = self._follow(self.t_check.get(k), check_s)

    def _follow(self, mean: float | None, t: float) -> float:
        """A running mean's next value after measuring t: t itself when lower (or the first), else an EMA step."""
        return t if mean is None or t < mean else (1 - self.ema) * mean + self.ema * t


class NoiseStream:
    """The sampler's noise, one (1, V) Exp(1) draw per generated token, in the order the plain loop draws it, with
    look-ahead: `get(i)` is the noise of token i (drawn on first use); `finish(n)` leaves the generator as a loop
    that drew exactly n would (generator None: the device's default generator, which is what None draws from)."""

    def __init__(self, vocab: int, device: torch.device, generator: torch.Generator | None):
        if generator is None:
            generator = (torch.default_generator if device.type == "cpu"
                         else torch.cuda.default_generators[device.index or 0])
        self.gen, self.vocab, self.device = generator, vocab, device
        self.noise: list[Tensor | None] = []
        self.states: list[Tensor] = [generator.get_state()]  # states[i]: before drawing token i's noise

    def get(self, i: int) -> Tensor:
        while len(self.noise) <= i:
            self.noise.append(exponential_noise((1, self.vocab), self.device, self.gen))
            self.states.append(self.gen.get_state())
        return self.noise[i]

    def release(self, i: int) -> None:
        """Token i is final: its noise is not needed again (32 KB each)."""
        self.noise[i] = None

    def finish(self, n: int) -> None:
        self.gen.set_state(self.states[min(n, len(self.noise))])


def copy_cache_slots(src: T3, dst: T3, start: int, stop: int) -> None:
    """dst's KV cache slots [start, stop) := src's (converted to dst's cache format): the draft starts from the
    target's prefill instead of running its own, and catches up on the positions of plain rounds the same way."""
    if stop <= start:
        return
    sk, sv, _ = src.kv_cache_tensors()
    dk, dv, ds = dst.kv_cache_tensors()
    if sk[0].device.type == "cpu" and sk[0].dtype == torch.float32 and cpu_kernels.available():
        torch.ops.chatterbox_fast.copy_kv_slots(sk, sv, dk, dv, ds, start, stop)  # one call, not ~10 ops a layer
        return
    pos = torch.arange(start, stop, device=src.speech_emb.weight.device)
    for s, d in zip(src.tfmr.layers, dst.tfmr.layers):
        sc, dc = s.self_attn.kv_cache, d.self_attn.kv_cache
        k, v = sc.read(stop, torch.float32)
        dc.update(pos, k[:, :, start:], v[:, :, start:])


class SpeculativeDecoder:
    """T3 generation with an int8 draft (module docstring): `decoder.generate(...)` returns what
    `decode.generate_tokens(model, ...)` returns with the fused step, bit for bit (every row of the k-token
    verification is computed exactly as the one-token step computes it: tests/generation/test_speculative.py).

    Needs the fused CPU step for `model` (fp32 or bf16-weight layer linears, fused projections, AVX-512 / AVX2
    kernels): `target_linears_supported` and `fused.fused_step_unsupported` say why not otherwise. With bf16 weights
    (use_mixed_precision on a CPU) the output is that of the bf16-weight plain loop, bit for bit. Holds the draft
    (~0.5 GB) and its own KV cache (int8); `release_caches()` frees both models' caches."""

    def __init__(self, model: T3, target_step: FusedDecodeStep | None = None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS, adaptive: bool = True):
        reason = target_linears_supported(model) or fused_step_unsupported(model)
        if reason is not None:
            raise ValueError(f"speculative decoding needs the fused CPU decode step: {reason}")
        self.model = model
        self.target_step = target_step or FusedDecodeStep(model)
        self.draft = build_int8_draft(model)
        self.draft_step = FusedDecodeStep(self.draft)
        self.draft_tokens = check_draft_tokens(draft_tokens)  # k, or with `adaptive` the largest k
        self.adaptive = bool(adaptive)  # each round's k from DraftLength (kept across generations), else always k
        self.lengths = DraftLength(self.draft_tokens) if self.adaptive else None
        self.last_stats: dict = {}  # the last generation's rounds / drafted / accepted / tokens / k per round

    def release_caches(self) -> None:
        self.model.release_caches()
        self.draft.release_caches()

    @torch.inference_mode()
    def generate(self, prefill_x: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 on_token: Callable[[int, Tensor], None] | None = None,
                 prefix: decode.PrefixKV | None = None) -> Tensor:
        """As decode.generate_tokens (same output, same generator state after; `prefix` as there); `last_stats`
        then holds the rounds / drafted / accepted / tokens counts and the histogram of k per round."""
        decode.check_max_new_tokens(self.model, params)
        k = check_draft_tokens(self.draft_tokens)
        lengths = self.lengths if self.adaptive else None
        if lengths is not None and lengths.k_max != k:
            lengths = self.lengths = DraftLength(k)
        model, draft = self.model, self.draft
        device = prefill_x.device
        B, S, _ = prefill_x.shape
        n_max = params.max_new_tokens
        for m in (model, draft):
            # a round may write up to k slots past the last emitted token; every read is of written slots (the
            # prefill's, decode_layers' <= its position, the draft's catch-up copy): no zeroing needed
            ensure_caches(m, B, S + n_max + k, zero=False)
        noise = NoiseStream(model.cfg.speech_vocab_size, device, generator)
        out = torch.full((1, n_max), STOP_SPEECH, dtype=torch.long, device=device)

        state = new_state(model, S, B, device)
        dstate = new_state(draft, S, B, device)
        tok = choose(decode.prefill(model, prefill_x, prefix), state, noise.get(0), params)
        copy_cache_slots(model, draft, 0, S)
        draft_filled = S  # the draft's cache slots [0, draft_filled) hold the tokens emitted so far
        out[:, 0] = tok
        if on_token is not None:
            on_token(0, tok)
        n, rounds, drafted, accepted = 1, 0, 0, 0
        k_hist: dict[int, int] = {}
        done = int(tok) == STOP_SPEECH
        while not done and n < n_max:
            kr = lengths.choose(n_max - n) if lengths is not None else min(k, n_max - n)  # tokens n .. n + kr - 1
            k_hist[kr] = k_hist.get(kr, 0) + 1
            t0 = time.perf_counter()
            feed = [tok]
            if kr > 1:  # the draft, from the fp32 state (positions, seen ids): kr - 1 proposals after tok
                pos = int(state.input_pos)
                copy_cache_slots(model, draft, draft_filled, pos)  # the slots of plain rounds since it last ran
                dstate.input_pos.copy_(state.input_pos)
                dstate.speech_pos.copy_(state.speech_pos)
                dstate.seen.copy_(state.seen)
            for j in range(kr - 1):
                feed.append(self.draft_step(draft, feed[-1], dstate, noise.get(n + j), params, 0))
            proposals = torch.cat(feed)  # (kr,): tok, then the draft's tokens n .. n + kr - 2
            t1 = time.perf_counter()
            logits = self.target_step.tokens_logits(model, proposals, state)  # (B, kr, V)
            t2 = time.perf_counter()
            rounds += 1
            drafted += kr - 1
            trials = hits = 0
            for j in range(kr):
                t = choose(logits[:, j], state, noise.get(n), params)  # the fp32 model's own draw of token n
                noise.release(n)
                out[:, n] = t
                if on_token is not None:
                    on_token(n, t)
                n += 1
                state.input_pos += 1
                state.speech_pos += 1
                tok = t
                if int(t) == STOP_SPEECH:
                    done = True
                    break
                if j + 1 < kr:
                    trials += 1
                    if int(t) != int(proposals[j + 1]):
                        break  # the draft's later proposals followed another token: discard them
                    hits += 1
            accepted += hits
            if kr > 1:  # the draft fed tok and kr - 2 proposals at pos ...: right up to the first disagreeing one
                draft_filled = min(int(state.input_pos), pos + min(hits, kr - 2) + 1)  # (not the last proposal)
            if lengths is not None:
                lengths.update(kr, trials, hits, t1 - t0 if kr > 1 else None, t2 - t1)
        noise.finish(n)
        self.last_stats = dict(rounds=rounds, drafted=drafted, accepted=accepted, tokens=n,
                               k_rounds=dict(sorted(k_hist.items())))
        return out[:, :n]
