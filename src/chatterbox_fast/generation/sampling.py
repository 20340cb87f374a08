"""Logits processing and sampling, all on device, no host sync (spec §1.5, §10.3).

Order (as the reference): CFG combine -> repetition penalty (over the set of generated ids, BOS included) ->
temperature -> min-p -> top-p -> softmax -> draw. The draw is an exponential race (argmax p / E with E ~ Exp(1)),
which samples exactly from p and needs no cumulative sum or host round trip; the noise can be injected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    cfg_weight: float = 0.5
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    top_p: float = 1.0
    max_new_tokens: int = 1000

    def __post_init__(self):
        _check(self.temperature, "temperature", lambda v: v > 0, "must be > 0")
        _check(self.cfg_weight, "cfg_weight", lambda v: v >= 0, "must be >= 0 (0 disables classifier-free guidance)")
        _check(self.repetition_penalty, "repetition_penalty", lambda v: v > 0, "must be > 0 (1.0 disables it)")
        _check(self.min_p, "min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        _check(self.top_p, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_weight > 0


def _check(value, name: str, ok, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} {rule}, got {value!r}")


def cfg_combine(logits: Tensor, cfg_weight: float) -> Tensor:
    """logits (B, V): row 0 conditional, row 1 unconditional -> (1, V) = c + w (c - u). B == 1: no CFG."""
    if logits.shape[0] == 1:
        return logits
    c, u = logits[0:1], logits[1:2]
    return c + cfg_weight * (c - u)


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF semantics, once per unique id in `seen` (bool (1, V)): negative logits *= p, others /= p."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Mask ids whose probability is below min_p * max probability (the top-1 always survives)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    thresh = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < thresh, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """HF TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p (keep >= 1 id)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: Tensor, seen: Tensor, p: SamplingParams) -> Tensor:
    """(B, V) raw speech logits (fp32) -> (1, V) processed logits, in the reference's order."""
    x = cfg_combine(logits, p.cfg_weight)
    x = repetition_penalty(x, seen, p.repetition_penalty)
    if p.temperature != 1.0:
        x = x / p.temperature
    x = min_p_filter(x, p.min_p)
    return top_p_filter(x, p.top_p)


def exponential_noise(shape, device, generator: torch.Generator | None = None) -> Tensor:
    return torch.empty(shape, device=device, dtype=torch.float32).exponential_(1.0, generator=generator)


def sample(probs: Tensor, noise: Tensor) -> Tensor:
    """Exponential race: argmax(probs / E), E ~ Exp(1) i.i.d. Draws id i with probability probs[i].

    probs (1, V), noise (1, V) -> (1,) long. Zero-probability ids can never win.
    """
    return torch.argmax(probs / noise, dim=-1)
