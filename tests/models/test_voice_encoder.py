"""VoiceEncoder vs the reference `VoiceEncoder.embeds_from_wavs([ref16], 16000)` on the oracle checkpoint.

Tolerances (fp32, CPU):
- embedding (unit vector, 256-d): atol 1e-5; measured <= 3e-8 on every oracle clip, from the same 16 kHz input and
  end to end from the file. The only difference upstream is the mel (~3e-7 relative, BLAS order).
- silence trim: exact sample indices (a one-frame shift moves the cut by 512 samples).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_fast.audio import load_wav_24k, resample_soxr
from chatterbox_fast.models.voice_encoder import (
    VE_KEYMAP,
    VoiceEncoder,
    VoiceEncoderConfig,
    build_voice_encoder,
    partial_layout,
    trim_silence,
)
from chatterbox_fast.weights import CheckpointError, check_file_consumed, read_safetensors
from synth import CLIPS, speech_like

ATOL = 1e-5
CASES = sorted(CLIPS) + ["array_short_0p1s", "array_silence_1s"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ve_state(oracle_state):
    return oracle_state("ve.safetensors")


@pytest.fixture(scope="module")
def ve(ve_state):
    return build_voice_encoder(ve_state)


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# ------------------------------------------------------------------------------------------------ loading


def test_checkpoint_loads_strictly(ve_state, ve):
    assert len(ve_state) == 16
    assert sum(v.numel() for v in ve_state.values()) == 1_423_618
    check_file_consumed(ve_state, [VE_KEYMAP], "ve.safetensors")
    assert all(p.device.type == "cpu" for p in ve.parameters())
    # the meta build + assign must give the same module as a plain build + copy (LSTM flat weights re-pointed)
    plain = VoiceEncoder().eval()
    plain.load_state_dict(ve_state, strict=True)
    x = torch.rand(3, 160, 40)
    with torch.inference_mode():
        torch.testing.assert_close(ve(x), plain(x), rtol=0, atol=0)

    missing = {k: v for k, v in ve_state.items() if k != "similarity_bias"}
    with pytest.raises(CheckpointError, match="missing: similarity_bias"):
        build_voice_encoder(missing)
    extra = dict(ve_state, **{"lstm.weight_ih_l3": torch.zeros(1024, 256)})
    with pytest.raises(CheckpointError, match="unexpected: lstm.weight_ih_l3"):
        build_voice_encoder(extra)
    wrong = dict(ve_state, **{"proj.bias": torch.zeros(128)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        build_voice_encoder(wrong)


# ------------------------------------------------------------------------------------------------ pieces


def test_partial_layout():
    cfg = VoiceEncoderConfig()
    assert cfg.partial_step == 77
    # (frames) -> (partials, covered length), worked by hand from the reference's get_num_wins
    # e.g. 204: divmod(121, 77) = (1, 44), (44 + 83) / 160 = 0.79 < 0.8 -> 1 partial, the mel is cut to 160;
    #      205: (1, 45), 128 / 160 = 0.8 -> 2 partials, padded to 237
    table = {1: (1, 160), 100: (1, 160), 160: (1, 160), 200: (1, 160), 204: (1, 160), 205: (2, 237),
             236: (2, 237), 237: (2, 237), 300: (3, 314), 991: (12, 1007), 1153: (14, 1161)}
    for frames, expected in table.items():
        assert partial_layout(frames, cfg) == expected, frames
    with pytest.raises(ValueError):
        partial_layout(0, cfg)


@pytest.mark.parametrize("case", CASES)
def test_trim_and_partials_match_reference(oracle_fixture, case):
    ref = oracle_fixture("audio", case)
    trimmed, (start, end) = trim_silence(ref["ref16"], top_db=20)
    assert [start, end] == ref["trim_index"]
    torch.testing.assert_close(trimmed, ref["trimmed"], rtol=0, atol=0)
    assert partial_layout(1 + len(trimmed) // 160)[0] == ref["ve_n_partials"]


@pytest.mark.parametrize("seed", range(6))
def test_trim_matches_librosa_on_bursts(seed):
    librosa = pytest.importorskip("librosa")  # test-only dependency
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3000, 40000))
    x = (1e-4 * rng.standard_normal(n)).astype(np.float32)
    a = int(rng.integers(0, n - 1000))
    b = int(rng.integers(a + 1, min(n, a + 12000)))
    x[a:b] += (rng.uniform(0.01, 0.5) * np.sin(np.arange(b - a) * 0.05)).astype(np.float32)
    theirs, index = librosa.effects.trim(x, top_db=20)
    ours, (start, end) = trim_silence(torch.from_numpy(x), top_db=20)
    assert [start, end] == index.tolist()
    np.testing.assert_array_equal(ours.numpy(), theirs)


# ------------------------------------------------------------------------------------------------ embedding


@pytest.mark.parametrize("case", CASES)
def test_embedding_matches_reference_from_16k(oracle_fixture, ve, case):
    ref = oracle_fixture("audio", case)
    with torch.inference_mode():
        ours = ve.embeds_from_wav(ref["ref16"])
    assert ours.shape == (1, 256)
    assert abs(float(ours.norm()) - 1.0) < 1e-5
    assert _max_err(ours, ref["ve_embed"]) <= ATOL


@pytest.mark.parametrize("stem", sorted(CLIPS))
def test_embedding_end_to_end_from_file(oracle_ckpt, oracle_fixture, ve, stem):
    """File -> load_wav_24k -> soxr 24k->16k -> embeds_from_wav, the path prepare_conditionals takes."""
    ref = oracle_fixture("audio", stem)
    ref16 = resample_soxr(load_wav_24k(oracle_ckpt / "clips" / f"{stem}.wav"), 24000, 16000)
    with torch.inference_mode():
        ours = ve.embeds_from_wav(ref16)  # numpy input is accepted
    assert _max_err(ours, ref["ve_embed"]) <= ATOL


def test_short_inputs_and_errors(ve):
    with torch.inference_mode():
        e = ve.embeds_from_wav(torch.from_numpy(speech_like(0.1, 16000, seed=8)))  # 10 frames -> 1 zero-padded partial
        assert e.shape == (1, 256) and torch.isfinite(e).all()
        with pytest.raises(ValueError, match="NaN/inf"):
            ve.embeds_from_wav(torch.tensor([0.1, float("nan")] * 200))
        with pytest.raises(ValueError, match="empty"):
            ve.embeds_from_wav(torch.zeros(0))
        with pytest.raises(ValueError, match=r"\(L,\)"):
            ve.embeds_from_wav(torch.zeros(2, 1600))
        with pytest.raises(ValueError, match="at least"):
            ve.embeds_from_wav(torch.full((150,), 0.1))  # shorter than the STFT's reflect padding


def test_zero_embedding_is_an_error(ve_state):
    """If every partial maps to zero after the ReLU the reference returns NaN; we raise instead."""
    dead = dict(ve_state, **{"proj.bias": torch.full((256,), -1e4)})
    with torch.inference_mode(), pytest.raises(ValueError, match="silent or degenerate"):
        build_voice_encoder(dead).embeds_from_wav(torch.from_numpy(speech_like(1.0, 16000, seed=1)))
