"""T3 generation: prefill, a static-shape `decode_one_token`, and the sampling loop (spec §1.4-§1.6).

The loop keeps everything on the device: the output buffer is preallocated, positions are device tensors updated in
place, the repetition-penalty id set is a boolean mask updated by scatter, and the end-of-speech check syncs with the
host only every `eos_check_every` steps (the output is then trimmed exactly at the first EOS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..constants import START_SPEECH, STOP_SPEECH, SPEECH_VOCAB_SIZE
from ..models.t3 import T3
from .sampling import SamplingParams, exponential_noise, process_logits, sample

KV_BUCKET = 128  # decode attends over the cache in buckets of this many slots (few static shapes to compile)


@dataclass
class DecodeState:
    """Device-side state of one generation (all tensors preallocated before the loop)."""

    input_pos: Tensor  # (1,) long: absolute (RoPE / cache) position of the next token
    speech_pos: Tensor  # (1,) long: learned speech position of the next token
    seen: Tensor  # (1, V) bool: ids already generated (BOS included), for the repetition penalty
    batch: int  # 2 with CFG, else 1


def cache_len(n: int) -> int:
    """Cache length allocated for n positions: n rounded up to a multiple of 2 * KV_BUCKET, so that requests of
    similar length share one cache (and its compiled graphs / CUDA graphs) instead of reallocating, plus one spare
    bucket, so that the attention never reads the whole cache: a full-length slice is contiguous, which inductor
    compiles as a graph of its own (minutes on a CPU) the first time a generation reaches it."""
    return -(-n // (2 * KV_BUCKET)) * (2 * KV_BUCKET) + KV_BUCKET


def kv_bucket(n_filled: int, max_seq: int) -> int:
    """Static attention length covering positions < n_filled."""
    return min(max_seq, -(-n_filled // KV_BUCKET) * KV_BUCKET)


def ensure_caches(model: T3, batch: int, n: int, zero: bool = True) -> None:
    """A KV cache for `batch` rows and at least n positions: reallocated (cache_len(n)) when too small, re-created
    at its previous size after release_caches, else kept. zero=False: the caller reads only slots it wrote (the
    fused CPU step, the speculative decoder), so a new cache need not be zeroed (KVCache; on a CPU that skips a
    pass over 0.7 GB per request, and the slots a generation never reaches are never touched); zero=True also
    replaces a cache that was allocated without zeros (masked readers of a whole bucket need them)."""
    if n > model.max_seq or batch != model.max_batch:
        model.setup_caches(batch, cache_len(n), zero)
    else:  # a no-op unless released or unzeroed when zeros are asked for (setup_caches decides)
        model.setup_caches(batch, model.max_seq, zero)


class PrefixKV:
    """The KV-cache slots [0, length) of a prefix that every row of the prefill shares, computed once and restored
    into the cache by later prefills (`prefill(..., prefix=)`): T3's voice conditioning without its last token
    (the speaker embedding and the 32 perceiver outputs depend on the voice only; the emotion token after them on
    `exaggeration`, so it stays in the per-request part). The CFG rows share it too, so even its first use runs the
    prefix once for both rows. Holds the prefix embeddings it was computed from and refuses others.

    Memory: 2 x layers x length x D values in the cache's dtype (T3, fp32: 30 x 2 x 33 x 1024 x 4 B = 8 MB)."""

    def __init__(self, length: int):
        if length < 1:
            raise ValueError(f"PrefixKV: length must be >= 1, got {length}")
        self.length = length
        self.embeds: Tensor | None = None  # (length, D): the embeddings the slots were computed from
        self.slots: list[tuple[Tensor, ...]] | None = None  # per layer: k, v (1, H, length, hd)[, k / v scales]

    def _usable(self, model: T3, embeds: Tensor) -> bool:
        if self.slots is None or not torch.equal(self.embeds, embeds):
            return False
        cache = model.tfmr.layers[0].self_attn.kv_cache
        return self.slots[0][0].dtype == cache.k_cache.dtype and self.slots[0][0].device == cache.k_cache.device

    def _fill(self, model: T3, embeds: Tensor) -> None:
        """Run the prefix (batch 1: every row's cache slots get the result) and keep a copy of its slots."""
        P = self.length
        model.forward_hidden(embeds[None], torch.arange(P, device=embeds.device))
        slots = []
        for layer in model.tfmr.layers:
            c = layer.self_attn.kv_cache
            parts = (c.k_cache, c.v_cache) + ((c.k_scale, c.v_scale) if c.quantized else ())
            slots.append(tuple(t[:1, :, :P].clone() for t in parts))
        self.embeds, self.slots = embeds.clone(), slots

    def _restore(self, model: T3) -> None:
        P = self.length
        for layer, saved in zip(model.tfmr.layers, self.slots):
            c = layer.self_attn.kv_cache
            parts = (c.k_cache, c.v_cache) + ((c.k_scale, c.v_scale) if c.quantized else ())
            for t, s in zip(parts, saved):
                t[:, :, :P].copy_(s)  # (1, ...) -> every row

    def load_into(self, model: T3, x: Tensor) -> None:
        """Make the cache slots [0, length) of every row hold the prefix of x (B, S, D), whose rows must all
        start with the same `length` embeddings: restored when this prefix was computed before, else computed."""
        P = self.length
        if x.shape[1] <= P:
            raise ValueError(f"PrefixKV: the prefill ({x.shape[1]} positions) must extend past the prefix ({P})")
        embeds = x[0, :P]
        if any(not torch.equal(x[b, :P], embeds) for b in range(1, x.shape[0])):
            raise ValueError("PrefixKV: the rows of the prefill do not share the prefix")
        if self._usable(model, embeds):
            self._restore(model)
        else:
            self._fill(model, embeds)


def prefill(model: T3, x: Tensor, prefix: PrefixKV | None = None) -> Tensor:
    """x (B, S, D) prefill embeddings -> raw speech logits at the last position (B, V), fp32. With `prefix`, the
    first prefix.length positions come from it (restored, or computed once for all rows) and only the rest runs
    here, attending to them through the cache."""
    S = x.shape[1]
    if prefix is None:
        h = model.forward_hidden(x, torch.arange(S, device=x.device))
    else:
        prefix.load_into(model, x)
        P = prefix.length
        h = model.forward_hidden(x[:, P:], torch.arange(P, S, device=x.device), kv_len=S)
    return model.speech_logits(h[:, -1])


def step_logits(model: T3, token: Tensor, state: DecodeState, kv_len: int) -> Tensor:
    """Feed one token (1,) at state's positions -> raw speech logits (B, V)."""
    x = model.speech_embed(token, state.speech_pos, state.batch)
    h = model.forward_hidden(x, state.input_pos, kv_len)
    return model.speech_logits(h[:, -1])


def decode_one_token(model: T3, token: Tensor, state: DecodeState, noise: Tensor, params: SamplingParams,
                     kv_len: int) -> Tensor:
    """One full decode step: logits -> processors -> draw. Returns the next token (1,) long, advances state."""
    logits = step_logits(model, token, state, kv_len)
    nxt = choose(logits, state, noise, params)
    state.input_pos += 1
    state.speech_pos += 1
    return nxt


def choose(logits: Tensor, state: DecodeState, noise: Tensor, params: SamplingParams) -> Tensor:
    """Process raw logits (B, V) and draw the next id (1,); mark it as seen."""
    probs = torch.softmax(process_logits(logits, state.seen, params), dim=-1)
    nxt = sample(probs, noise)
    state.seen.scatter_(1, nxt.view(1, 1), True)
    return nxt


def new_state(model: T3, prefill_len: int, batch: int, device) -> DecodeState:
    seen = torch.zeros(1, model.cfg.speech_vocab_size, dtype=torch.bool, device=device)
    seen[0, START_SPEECH] = True  # the reference's generated_ids starts with the BOS
    return DecodeState(
        input_pos=torch.tensor([prefill_len], device=device),
        speech_pos=torch.tensor([1], device=device),  # the first generated token has learned position 1
        seen=seen,
        batch=batch,
    )


def check_max_new_tokens(model: T3, params: SamplingParams) -> None:
    """ValueError unless max_new_tokens fits T3's learned speech positions (cfg.max_speech_tokens: 4096 new tokens,
    ~164 s of audio); past them the position embedding has no row (the reference fails there with an IndexError)."""
    limit = model.cfg.max_speech_tokens
    if params.max_new_tokens > limit:
        raise ValueError(f"max_new_tokens must be <= {limit} (T3's learned speech positions), got "
                         f"{params.max_new_tokens}; split longer text into several requests")


@torch.inference_mode()
def generate_tokens(
    model: T3,
    prefill_x: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    eos_check_every: int | None = None,
    step_fn: Callable | None = None,
    on_token: Callable[[int, Tensor], None] | None = None,
    prefix: PrefixKV | None = None,
) -> Tensor:
    """Sample speech tokens after the prefill embeddings `prefill_x` (B, S, D).

    Returns the raw tokens (1, n) as the reference's `predicted`: up to and including the first EOS, or
    max_new_tokens long. `step_fn` replaces `decode_one_token` (e.g. a compiled version). `prefix`: see prefill.
    """
    check_max_new_tokens(model, params)
    device = prefill_x.device
    B, S, _ = prefill_x.shape
    n_max = params.max_new_tokens
    # a step that reads only the slots it wrote (FusedDecodeStep) needs no zeroed cache; any other (the module
    # path's bucketed, masked attention) does
    ensure_caches(model, B, S + n_max, zero=not getattr(step_fn, "reads_written_slots_only", False))
    if eos_check_every is None:
        eos_check_every = 1 if device.type == "cpu" else 16
    step = step_fn or decode_one_token
    V = model.cfg.speech_vocab_size
    out = torch.full((1, n_max), STOP_SPEECH, dtype=torch.long, device=device)

    state = new_state(model, S, B, device)
    logits = prefill(model, prefill_x, prefix)
    tok = choose(logits, state, exponential_noise((1, V), device, generator), params)
    out[:, 0] = tok
    n = n_max
    checked = 0
    for i in range(1, n_max + 1):
        if on_token is not None:
            on_token(i - 1, tok)
        if i % eos_check_every == 0 or i == n_max:
            hit = (out[0, checked:i] == STOP_SPEECH).nonzero()
            if hit.numel():
                n = checked + int(hit[0, 0]) + 1
                break
            checked = i
        if i == n_max:
            break
        kv_len = kv_bucket(S + i, model.max_seq)
        tok = step(model, tok, state, exponential_noise((1, V), device, generator), params, kv_len)
        out[:, i] = tok
    return out[:, :n]


def clean_speech_tokens(tokens: Tensor) -> Tensor:
    """The reference's clean-up: keep what follows the first SOS, cut at the first EOS, drop ids >= 6561.

    tokens (n,) or (1, n) -> (m,) long. (The reference raises when SOS occurs twice; we keep what follows the first.)
    """
    t = tokens.reshape(-1)
    sos = (t == START_SPEECH).nonzero()
    if sos.numel():
        t = t[int(sos[0, 0]) + 1:]
    eos = (t == STOP_SPEECH).nonzero()
    if eos.numel():
        t = t[: int(eos[0, 0])]
    return t[t < SPEECH_VOCAB_SIZE]
