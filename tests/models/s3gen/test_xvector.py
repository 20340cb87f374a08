"""CAMPPlus x-vector: key coverage, strict loading, parity with the reference (dumps/speaker.py), masked batching.

Tolerance: x-vectors within atol 1e-5 + rtol 1e-5 of the reference. Same fp32 ops in the same order, so it is
bit-exact on this machine (measured max |err| 0.0); the margin covers conv/GEMM algorithm choices on other CPUs
and thread counts (fp32 reassociation through ~60 conv layers, values O(0.1) to O(2)). Batched (masked) vs one-by-one
calls use a different summation order for the means, measured max |err| <= 1e-6, same tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatterbox_fast.models.s3gen.xvector import SPEAKER_KEYMAP, CAMPPlus, load_campplus
from helpers import spec_keys
from chatterbox_fast.weights import CheckpointError, read_safetensors

CLIPS = ("voice_9p5s_24k", "voice_6s_24k", "voice_10s_24k", "voice_12s_44k_stereo", "voice_0p5s_16k")
ATOL = RTOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), f"max |err| {err:.3g} > atol {ATOL} + rtol {RTOL}"
    return err


def _spec_keys(prefix: str) -> dict[str, tuple[int, ...]]:
    return spec_keys("s3gen", prefix)  # vendored from the spec: tests/data/keys


@pytest.fixture(scope="module")
def s3gen_state(oracle_state):
    return oracle_state("s3gen.safetensors")


@pytest.fixture(scope="module")
def camp(s3gen_state):
    return load_campplus(s3gen_state)


@pytest.fixture(scope="module")
def perturbed(s3gen_state, oracle_fixture):
    """The oracle weights with the dump's random BN statistics/affines (the file's BNs are identities)."""
    p = oracle_fixture("speaker", "perturbed")
    state = dict(s3gen_state)
    assert p["speaker_encoder"], "dump has no perturbed BN tensors"
    for k, v in p["speaker_encoder"].items():
        full = "speaker_encoder." + k
        assert full in state and state[full].shape == v.shape, full
        state[full] = v
    return load_campplus(state), p


def test_key_coverage_against_spec():
    spec = _spec_keys("speaker_encoder.")
    assert len(spec) > 500  # 3 dense blocks of 12/24/16 layers, each with 2 BNs: this is the real table
    with torch.device("meta"):
        model = CAMPPlus()
    ours = {SPEAKER_KEYMAP.prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = {k for k in spec if SPEAKER_KEYMAP.dropped(k[len(SPEAKER_KEYMAP.prefix):])}
    assert dropped and all(k.endswith("num_batches_tracked") for k in dropped)
    assert sorted(set(spec) - dropped - set(ours)) == []  # nothing in the file left unloaded
    assert sorted(set(ours) - set(spec)) == []  # nothing in the model left uninitialised
    assert {k: spec[k] for k in ours} == ours  # shapes
    assert "speaker_encoder.xvector.dense.nonlinear.batchnorm.weight" not in ours  # final BN has no affine


def test_strict_load_fails_on_missing_or_extra_key(s3gen_state):
    broken = {k: v for k, v in s3gen_state.items() if k != "speaker_encoder.xvector.block2.tdnnd7.linear1.weight"}
    with pytest.raises(CheckpointError, match="block2.tdnnd7.linear1.weight"):
        load_campplus(broken)
    extra = dict(s3gen_state)
    extra["speaker_encoder.xvector.block1.tdnnd13.linear1.weight"] = torch.zeros(128, 512, 1)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_campplus(extra)


@pytest.mark.parametrize("clip", CLIPS)
@torch.inference_mode()
def test_xvector_matches_reference(camp, oracle_fixture, clip):
    ref = oracle_fixture("speaker", clip)
    out = camp(ref["fbank"][None])
    assert out.shape == (1, 192) and out.dtype == torch.float32
    _close(out, ref["xvector"])
    if "embed_ref_embedding" in ref:  # the dump replicated embed_ref's own path
        assert torch.equal(ref["embed_ref_embedding"], ref["xvector"])


@torch.inference_mode()
def test_xvector_matches_reference_with_nontrivial_batchnorm(perturbed, oracle_fixture):
    model, p = perturbed
    ref = oracle_fixture("speaker", p["clip"])
    out = model(ref["fbank"][None])
    assert out.abs().max() > 1.0  # BN with real statistics: values far from the identity-BN case
    _close(out, p["xvector"])


@torch.inference_mode()
def test_batch_of_different_lengths_equals_one_by_one(perturbed, camp, oracle_fixture):
    model, _ = perturbed
    fbanks = [oracle_fixture("speaker", c)["fbank"] for c in ("voice_9p5s_24k", "voice_0p5s_16k")]
    fbanks.append(fbanks[0][:333])  # a third length: mid-segment (CAM pools 100-frame segments), odd frame count
    lens = torch.tensor([f.shape[0] for f in fbanks])
    batch = torch.zeros(len(fbanks), int(lens.max()), 80)
    for i, f in enumerate(fbanks):
        batch[i, : f.shape[0]] = f
    batch[1, lens[1]:] = 7.0  # junk in the padding must not matter
    out = model(batch, lens)
    for i, f in enumerate(fbanks):
        _close(out[i], model(f[None])[0])
    # and the masked path with the file's weights still reproduces the reference values
    ref = oracle_fixture("speaker", "voice_0p5s_16k")
    _close(camp(batch[1:3], lens[1:3])[0], ref["xvector"][0])


@torch.inference_mode()
def test_batchnorm_stays_in_eval_math(perturbed, oracle_fixture):
    model, _ = perturbed
    fbank = oracle_fixture("speaker", "voice_0p5s_16k")["fbank"][None]
    expected = model(fbank)
    model.train()
    try:
        assert torch.equal(model(fbank), expected)
    finally:
        model.eval()


def test_bad_input_gives_clear_errors():
    with torch.device("meta"):
        model = CAMPPlus()
    with pytest.raises(ValueError, match=r"\(B, T, 80\)"):
        model(torch.zeros(100, 80, device="meta"))
    with pytest.raises(ValueError, match=r"\(B, T, 80\)"):
        model(torch.zeros(1, 80, 100, device="meta"))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 100, 80, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        model([[0.0] * 80])
    with pytest.raises(ValueError, match="at least 3"):
        model(torch.zeros(1, 2, 80, device="meta"))
    x = torch.zeros(2, 50, 80)
    with pytest.raises(ValueError, match="lengths"):
        model(x, torch.tensor([50]))
    with pytest.raises(ValueError, match="lengths"):
        model(x, torch.tensor([50.0, 20.0]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[3, 50\]"):
        model(x, torch.tensor([51, 20]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[3, 50\]"):
        model(x, torch.tensor([50, 0]))


# ---- end to end from a 16 kHz waveform, through our own Kaldi fbank front-end -------------------------------------

@pytest.mark.parametrize("clip", ("voice_6s_24k", "voice_0p5s_16k"))
@torch.inference_mode()
def test_xvector_from_waveform(camp, oracle_fixture, clip):
    from chatterbox_fast.audio.mel import kaldi_fbank

    ref = oracle_fixture("speaker", clip)
    fbank = kaldi_fbank(ref["wav16"])  # (T, 80)
    assert fbank.shape == ref["fbank"].shape
    _close(camp(fbank[None]), ref["xvector"])
