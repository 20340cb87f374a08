"""The four front-ends and the filterbanks vs the reference (oracle fixtures) and librosa (test-only).

Tolerances, all fp32 on CPU, with the errors measured on the oracle clips:
- Slaney filterbanks: rtol 1e-6 / atol 1e-9 (the brief's ~1e-6); measured 0 (same float64 math, same rounding).
- s3gen_mel, s3_tokenizer_log_mel, kaldi_fbank (log domain): atol 1e-4; measured 0 (same torch ops). The margin
  covers FFT/BLAS reorderings elsewhere (~1e-6 relative -> ~1e-6 in log units); a wrong window, pad or bank gives
  errors of 1e-2 and more.
- voice_encoder_mel (linear power, values 1e-10..1e2): rtol 1e-5 elementwise + atol 1e-6 * max; measured 3.5e-7
  relative (librosa sums the mel in numpy's float32 BLAS, we in torch's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_fast.audio import (
    kaldi_fbank,
    kaldi_mel_banks,
    s3_tokenizer_log_mel,
    s3gen_mel,
    slaney_mel_filterbank,
    voice_encoder_mel,
)
from synth import CLIPS, speech_like

LOG_ATOL = 1e-4
CASES = sorted(CLIPS) + ["array_short_0p1s", "array_silence_1s"]


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def _assert_power_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()) + 1e-30)


# ------------------------------------------------------------------------------------------------ filterbanks


def test_filterbanks_match_reference(oracle_fixture):
    ref = oracle_fixture("audio", "filterbanks")
    for name, args in {
        "s3gen": (24000, 1920, 80, 0, 8000),
        "tokenizer": (16000, 400, 128),  # librosa defaults: fmin 0, fmax sr/2
        "ve": (16000, 400, 40, 0, 8000),
    }.items():
        ours = slaney_mel_filterbank(*args)
        assert ours.dtype == torch.float32 and ours.shape == ref[name].shape, name
        torch.testing.assert_close(ours, ref[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "sr, n_fft, n_mels, fmin, fmax",
    [(22050, 1024, 128, 0.0, None), (44100, 2048, 64, 30.0, 11000.0), (16000, 512, 80, 20.0, 7600.0),
     (8000, 256, 20, 0.0, 4000.0), (24000, 1920, 100, 0.0, 12000.0)],
)
def test_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")  # test-only dependency
    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    ours = slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-6, atol=1e-9)


def test_filterbank_cached_and_checked():
    assert slaney_mel_filterbank(16000, 400, 40, 0, 8000) is slaney_mel_filterbank(16000, 400, 40, 0.0, 8000.0)
    with pytest.raises(ValueError, match="fmax"):
        slaney_mel_filterbank(16000, 400, 40, 0, 9000)
    with pytest.raises(ValueError):
        slaney_mel_filterbank(16000, 0, 40)


def test_kaldi_banks_shape():
    bank = kaldi_mel_banks(80)
    assert bank.shape == (80, 257)
    assert float(bank[:, -1].abs().max()) == 0.0  # Nyquist column is zero
    assert float(bank.max()) <= 1.0 and float(bank.min()) == 0.0  # triangles, no area norm
    with pytest.raises(ValueError, match="4 mel bins"):
        kaldi_mel_banks(3)


# ------------------------------------------------------------------------------------------------ front-ends


@pytest.mark.parametrize("case", CASES)
def test_s3gen_mel_matches_reference(oracle_fixture, case):
    ref = oracle_fixture("audio", case)
    ours = s3gen_mel(ref["wav24"][:240000])
    assert ours.shape == ref["s3gen_mel"].shape == (1, 80, min(len(ref["wav24"]), 240000) // 480)
    assert _max_err(ours, ref["s3gen_mel"]) <= LOG_ATOL


@pytest.mark.parametrize("case", CASES)
def test_tokenizer_log_mel_matches_reference(oracle_fixture, case):
    ref = oracle_fixture("audio", case)
    prompt = s3_tokenizer_log_mel(ref["ref16"][:96000])  # T3 prompt path (soxr audio, first 6 s)
    assert prompt.shape == ref["tok_mel_prompt"].shape
    assert _max_err(prompt, ref["tok_mel_prompt"]) <= LOG_ATOL
    embed_ref = s3_tokenizer_log_mel(ref["ta16"][0])  # S3Gen prompt path (torchaudio-resampled audio)
    assert embed_ref.shape == ref["tok_mel_ref"].shape
    assert _max_err(embed_ref, ref["tok_mel_ref"]) <= LOG_ATOL


@pytest.mark.parametrize("case", CASES)
def test_kaldi_fbank_matches_reference(oracle_fixture, case):
    ref = oracle_fixture("audio", case)
    ours = kaldi_fbank(ref["ta16"][0])
    assert ours.shape == ref["fbank"].shape == (1 + (ref["ta16"].shape[1] - 400) // 160, 80)
    assert _max_err(ours, ref["fbank"]) <= LOG_ATOL
    # CAMPPlus' extract_feature = fbank minus its per-utterance mean (done by the CAMPPlus code, checked here)
    assert _max_err((ours - ours.mean(0, keepdim=True))[None], ref["fbank_cmn"]) <= LOG_ATOL


def test_kaldi_fbank_edge_cases_match_reference(oracle_fixture):
    cases = oracle_fixture("audio", "fbank_extra")
    keys = sorted(k[:-3] for k in cases if k.endswith("_in"))
    assert len(keys) == 6
    for key in keys:
        bins = int(key.split("_")[1])
        ours = kaldi_fbank(cases[f"{key}_in"], num_mel_bins=bins)
        assert ours.shape == cases[f"{key}_out"].shape, key
        assert _max_err(ours, cases[f"{key}_out"]) <= LOG_ATOL, key


@pytest.mark.parametrize("case", CASES)
def test_voice_encoder_mel_matches_reference(oracle_fixture, case):
    ref = oracle_fixture("audio", case)
    ours = voice_encoder_mel(ref["trimmed"])
    assert ours.shape == (1 + len(ref["trimmed"]) // 160, 40)
    _assert_power_close(ours, ref["ve_mel"])


def test_voice_encoder_mel_matches_librosa():
    librosa = pytest.importorskip("librosa")  # test-only dependency
    x = speech_like(1.37, 16000, seed=21)
    spec = np.abs(librosa.stft(x, n_fft=400, hop_length=160, win_length=400, center=True, pad_mode="reflect")) ** 2
    theirs = (librosa.filters.mel(sr=16000, n_fft=400, n_mels=40, fmin=0, fmax=8000) @ spec).T
    _assert_power_close(voice_encoder_mel(torch.from_numpy(x)), torch.from_numpy(np.ascontiguousarray(theirs)))


# ------------------------------------------------------------------------------------------------ batching, errors


@pytest.mark.parametrize("fn, min_len", [(s3gen_mel, 721), (s3_tokenizer_log_mel, 201), (voice_encoder_mel, 201),
                                         (kaldi_fbank, 400)])
def test_batch_equals_rows_and_short_input_errors(fn, min_len):
    x = torch.from_numpy(np.stack([speech_like(0.37, 16000, seed=s) for s in (1, 2, 3)]))  # (3, 5920)
    batch = fn(x)
    rows = [fn(row) for row in x]
    for i, row in enumerate(rows):
        one = row[0] if fn is s3gen_mel else row  # s3gen_mel keeps a batch axis for 1-D input
        assert _max_err(batch[i], one) <= 1e-5
    fn(torch.zeros(min_len) + 0.01)  # the shortest accepted input works
    with pytest.raises(ValueError, match="at least"):
        fn(torch.zeros(min_len - 1) + 0.01)
    with pytest.raises(TypeError, match="floating point"):
        fn(torch.zeros(1000, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(L,\) or \(B, L\)"):
        fn(torch.zeros(1, 1, 1000))


def test_frame_counts_and_numpy_input():
    for n in (721, 960, 961, 24000, 24479, 24480):
        assert s3gen_mel(torch.full((n,), 0.1)).shape == (1, 80, n // 480)
    for n in (400, 559, 560, 16000):
        x = np.full(n, 0.1, dtype=np.float32)
        assert s3_tokenizer_log_mel(x).shape == (128, n // 160)
        assert voice_encoder_mel(x).shape == (1 + n // 160, 40)
        assert kaldi_fbank(x).shape == (1 + (n - 400) // 160, 80)


def test_tokenizer_log_mel_per_row_max():
    """Rows of a batch are normalised by their own max, as the reference (one utterance at a time) does."""
    quiet = torch.from_numpy(speech_like(0.5, 16000, seed=4))
    batch = s3_tokenizer_log_mel(torch.stack([quiet, 100 * quiet]))
    assert _max_err(batch[0], s3_tokenizer_log_mel(quiet)) <= 1e-5
    assert _max_err(batch[1], s3_tokenizer_log_mel(100 * quiet)) <= 1e-5


def test_front_ends_on_meta_device():
    """Device-agnostic: windows and banks follow the input (meta stands in for an accelerator here)."""
    x = torch.zeros(2, 16000, device="meta")
    assert s3gen_mel(x).shape == (2, 80, 33)
    assert s3_tokenizer_log_mel(x).shape == (2, 128, 100)
    assert kaldi_fbank(x).shape == (2, 98, 80)
