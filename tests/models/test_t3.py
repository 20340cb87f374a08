"""T3 against the reference: key coverage, strict loading, conditioning, prefill and teacher-forced decoding.

Tolerances (fp32, same weights): conditioning vectors and prefill logits <= 1e-4 abs (30 layers of fp32 GEMMs in a
different summation order give ~1e-5); processed distributions <= 1e-4 abs per probability.
"""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast.config import T3Config
from chatterbox_fast.generation.decode import PrefixKV, new_state, prefill, step_logits
from chatterbox_fast.generation.sampling import SamplingParams, process_logits
from chatterbox_fast.models.t3 import T3, T3_KEYMAP
from chatterbox_fast.weights import CheckpointError, load_strict, read_safetensors
from helpers import spec_keys

torch.set_grad_enabled(False)


def test_module_keys_match_spec_exactly():
    with torch.device("meta"):
        model = T3(T3Config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == spec_keys("t3_cfg")


def _tiny_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in T3(T3Config.tiny()).state_dict().items()}


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.pop("tfmr.layers.1.mlp.up_proj.weight"), "missing: tfmr.layers.1.mlp.up_proj.weight"),
    (lambda s: s.__setitem__("tfmr.extra.weight", torch.zeros(1)), "unexpected: tfmr.extra.weight"),
    (lambda s: s.__setitem__("speech_head.weight", torch.zeros(3, 3)), "speech_head.weight: checkpoint (3, 3)"),
])
def test_strict_load_names_the_bad_key(mutate, needle):
    state = _tiny_state()
    mutate(state)
    with torch.device("meta"):
        model = T3(T3Config.tiny())
    with pytest.raises(CheckpointError) as err:
        load_strict(model, state, T3_KEYMAP, name="t3_cfg.safetensors")
    assert needle in str(err.value)


@pytest.fixture(scope="module")
def t3(oracle_ckpt):
    with torch.device("meta"):
        model = T3(T3Config())
    load_strict(model, read_safetensors(oracle_ckpt / "t3_cfg.safetensors"), T3_KEYMAP, name="t3_cfg")
    return model.eval()


@pytest.mark.parametrize("exg", [0.5, 0.7])
def test_conditioning_matches_reference(t3, oracle_fixture, exg):
    ref = oracle_fixture("t3", f"cond_{exg}")
    ours = t3.cond_embeds(ref["speaker_emb"], ref["prompt_tokens"].long(), torch.tensor([ref["exaggeration"]]))
    assert ours.shape == ref["cond_embeds"].shape == (1, 34, 1024)
    torch.testing.assert_close(ours, ref["cond_embeds"], atol=1e-4, rtol=0)


def _prefill_x(t3, oracle_fixture, ref, cfg_batch=True):
    cond = oracle_fixture("t3", f"cond_{ref['exaggeration']}")
    c = t3.cond_embeds(cond["speaker_emb"], cond["prompt_tokens"].long(), torch.tensor([ref["exaggeration"]]))
    return t3.prefill_embeds(c, ref["text_ids"].long(), cfg_batch=cfg_batch)


@pytest.mark.parametrize("name", ["decode_defaults", "prefill_plain_0.7"])
def test_prefill_matches_reference(t3, oracle_fixture, name):
    ref = oracle_fixture("t3", name)
    x = _prefill_x(t3, oracle_fixture, ref)
    # double BOS, CFG row with zeroed text-token embeddings: the reference's exact inputs_embeds
    assert x.shape == ref["inputs_embeds"].shape
    torch.testing.assert_close(x, ref["inputs_embeds"], atol=1e-5, rtol=0)
    t3.setup_caches(2, x.shape[1] + 8)
    raw = ref["raw_logits"][0] if ref["raw_logits"].dim() == 3 else ref["raw_logits"]
    torch.testing.assert_close(prefill(t3, x), raw, atol=1e-4, rtol=0)
    prefix = PrefixKV(33)  # the engine's per-voice prefix: computed once for both rows, then restored
    for _ in range(2):
        torch.testing.assert_close(prefill(t3, x, prefix), raw, atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting", ["defaults", "sharp", "rep2"])
def test_teacher_forced_decode_matches_reference(t3, oracle_fixture, setting):
    ref = oracle_fixture("t3", f"decode_{setting}")
    params = SamplingParams(**ref["setting"])
    tokens = ref["tokens"].tolist()
    assert len(tokens) >= 100, "the reference fixture must hold >= 100 decode steps"
    x = _prefill_x(t3, oracle_fixture, ref)
    S = x.shape[1]
    t3.setup_caches(2, S + len(tokens))
    state = new_state(t3, S, 2, x.device)
    logits = prefill(t3, x)
    worst_raw = worst_p = 0.0
    for i, tok in enumerate(tokens):
        raw_err = (logits - ref["raw_logits"][i]).abs().max().item()
        probs = torch.softmax(process_logits(logits, state.seen, params), dim=-1)
        p_err = (probs - ref["probs"][i : i + 1]).abs().max().item()
        worst_raw, worst_p = max(worst_raw, raw_err), max(worst_p, p_err)
        assert raw_err <= 1e-4, f"step {i}: raw logits differ by {raw_err:.2e}"
        assert p_err <= 1e-4, f"step {i}: processed distribution differs by {p_err:.2e}"
        state.seen[0, tok] = True
        if i + 1 < len(tokens):
            t = torch.tensor([tok])
            logits = step_logits(t3, t, state, kv_len=min(t3.max_seq, S + i + 1 + 7))
            state.input_pos += 1
            state.speech_pos += 1
    print(f"{setting}: {len(tokens)} steps, max |raw logit err| {worst_raw:.2e}, max |prob err| {worst_p:.2e}")


def test_fuse_projections_and_meta_builds_skip_random_init(monkeypatch):
    """Loading replaces every initial value, so random init there is wasted time (2.7 s for fuse_projections' new
    linears on the full model; nn.Embedding's normal_ on meta imports torch's decomposition stack, ~2 s): neither
    may run it. On a real device `embedding` still initialises like nn.Embedding."""
    from torch import nn

    from chatterbox_fast.weights import embedding
    from helpers import tiny_t3

    model = tiny_t3()
    before = {n: p.clone() for n, p in model.named_parameters()}
    calls = []
    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        real = getattr(nn.init, name)

        def spy(t, *a, _real=real, _name=name, **k):
            calls.append((_name, t.device.type))
            return _real(t, *a, **k)
        monkeypatch.setattr(nn.init, name, spy)
    model.fuse_projections()
    assert [c for c in calls if c[1] != "meta"] == [], calls
    layer = model.tfmr.layers[0]
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([before[f"tfmr.layers.0.self_attn.{n}_proj.weight"]
                                                                   for n in "qkv"]))
    calls.clear()
    with torch.device("meta"):
        e = embedding(7, 4)
    assert e.weight.is_meta and e.weight.shape == (7, 4) and calls == []
    e = embedding(300, 50)
    assert e.weight.device.type == "cpu" and ("normal_", "cpu") in calls
    assert 0.8 < float(e.weight.std()) < 1.2  # initialised as nn.Embedding is (N(0, 1))
