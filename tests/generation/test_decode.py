"""The generation loop on a tiny random T3: CFG on/off, reproducibility, exact EOS trimming, token clean-up."""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast.constants import START_SPEECH, STOP_SPEECH
from chatterbox_fast.generation.decode import clean_speech_tokens, decode_one_token, generate_tokens
from chatterbox_fast.generation.sampling import SamplingParams

from helpers import tiny_t3

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_t3()


def _x(model, cfg_batch):
    torch.manual_seed(1)
    cond = model.cond_embeds(torch.randn(1, 256), torch.randint(0, 6561, (1, 20)), torch.tensor([0.5]))
    ids = torch.tensor([[255, 10, 11, 12, 2, 13, 0]])
    return model.prefill_embeds(cond, ids, cfg_batch=cfg_batch)


@pytest.mark.parametrize("cfg_weight", [0.0, 0.5])
def test_generation_runs_and_is_reproducible(tiny, cfg_weight):
    p = SamplingParams(cfg_weight=cfg_weight, max_new_tokens=60)
    x = _x(tiny, cfg_weight > 0)
    assert x.shape[0] == (2 if cfg_weight > 0 else 1)
    a = generate_tokens(tiny, x, p, generator=torch.Generator().manual_seed(3))
    b = generate_tokens(tiny, x, p, generator=torch.Generator().manual_seed(3))
    c = generate_tokens(tiny, x, p, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert a.shape[0] == 1 and 1 <= a.shape[1] <= 60
    assert not torch.equal(a, c) or a.shape[1] == 1


def _eos_at(step_no):
    """A step function that emits EOS at decode step `step_no` (and real samples elsewhere)."""
    calls = []

    def step(model, tok, state, noise, params, kv_len):
        calls.append(1)
        nxt = decode_one_token(model, tok, state, noise, params, kv_len)
        return torch.full_like(nxt, STOP_SPEECH) if len(calls) == step_no else nxt

    return step, calls


@pytest.mark.parametrize("eos_step", [1, 6, 13])
@pytest.mark.parametrize("every", [1, 4, 16])
def test_output_is_trimmed_exactly_at_eos(tiny, eos_step, every):
    p = SamplingParams(max_new_tokens=40)
    x = _x(tiny, True)
    step, calls = _eos_at(eos_step)
    out = generate_tokens(tiny, x, p, generator=torch.Generator().manual_seed(0), eos_check_every=every,
                          step_fn=step)
    ref = generate_tokens(tiny, x, p, generator=torch.Generator().manual_seed(0), eos_check_every=1,
                          step_fn=_eos_at(eos_step)[0])
    assert out.shape[1] == eos_step + 1  # prefill token + eos_step decode steps, EOS included
    assert out[0, -1] == STOP_SPEECH and (out == STOP_SPEECH).sum() == 1
    assert torch.equal(out, ref)
    assert len(calls) < eos_step + every  # stopped within one check interval


def test_max_new_tokens_caps_the_output(tiny):
    x = _x(tiny, True)
    out = generate_tokens(tiny, x, SamplingParams(max_new_tokens=3), generator=torch.Generator().manual_seed(0))
    assert out.shape[1] <= 3


def test_max_new_tokens_up_to_the_learned_speech_positions():
    """Every learned speech position can be used (max_new_tokens = cfg.max_speech_tokens runs to the end); one more
    is a clear ValueError before any work, not an IndexError in the position embedding."""
    from chatterbox_fast.config import T3Config
    from chatterbox_fast.models.t3 import T3

    torch.manual_seed(0)
    model = T3(T3Config.tiny(max_speech_tokens=24)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = _x(model, True)
    out = generate_tokens(model, x, SamplingParams(max_new_tokens=24), generator=torch.Generator().manual_seed(0))
    assert out.shape[1] == 24 and not (out == STOP_SPEECH).any()  # all 24 steps ran
    with pytest.raises(ValueError, match="max_new_tokens must be <= 24"):
        generate_tokens(model, x, SamplingParams(max_new_tokens=25))


def test_clean_speech_tokens_like_the_reference():
    t = torch.tensor([5, START_SPEECH, 7, 8, 7000, 9, STOP_SPEECH, 10])
    assert clean_speech_tokens(t).tolist() == [7, 8, 9]
    assert clean_speech_tokens(torch.tensor([[1, 2, STOP_SPEECH]])).tolist() == [1, 2]
    assert clean_speech_tokens(torch.tensor([STOP_SPEECH])).numel() == 0
