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


def ensure_caches(model: T3, batch: int, n: int) -> None:
    """A KV cache for `batch` rows and at least n positions: reallocated (cache_len(n)) when too small, re-created
    at its previous size after release_caches, else kept."""
    if n > model.max_seq or batch != model.max_batch:
        model.setup_caches(batch, cache_len(n))
    elif not model.caches_allocated:  # released after the last generation: back at the same size
        model.setup_caches(batch, model.max_seq)


def prefill(model: T3, x: Tensor) -> Tensor:
    """x (B, S, D) prefill embeddings -> raw speech logits at the last position (B, V), fp32."""
    input_pos = torch.arange(x.shape[1], device=x.device)
    h = model.forward_hidden(x, input_pos)
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


@torch.inference_mode()
def generate_tokens(
    model: T3,
    prefill_x: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    eos_check_every: int | None = None,
    step_fn: Callable | None = None,
    on_token: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Sample speech tokens after the prefill embeddings `prefill_x` (B, S, D).

    Returns the raw tokens (1, n) as the reference's `predicted`: up to and including the first EOS, or
    max_new_tokens long. `step_fn` replaces `decode_one_token` (e.g. a compiled version).
    """
    device = prefill_x.device
    B, S, _ = prefill_x.shape
    n_max = params.max_new_tokens
    ensure_caches(model, B, S + n_max)
    if eos_check_every is None:
        eos_check_every = 1 if device.type == "cpu" else 16
    step = step_fn or decode_one_token
    V = model.cfg.speech_vocab_size
    out = torch.full((1, n_max), STOP_SPEECH, dtype=torch.long, device=device)

    state = new_state(model, S, B, device)
    logits = prefill(model, prefill_x)
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
