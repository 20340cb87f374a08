"""load_audio / load_wav_24k: parity with librosa.load (reference oracle, and librosa itself where installed) and
clear errors for bad input.

Tolerance: 1e-6 absolute on samples in [-1, 1]. Reading is exact; soxr is deterministic, so the measured error is 0
(bit-identical); the margin only allows for soxr SIMD paths differing between machines.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_fast.audio import load_audio, load_wav_24k, s3gen_mel
from synth import CLIPS, speech_like

ATOL = 1e-6


@pytest.mark.parametrize("stem", sorted(CLIPS))
def test_clip_matches_reference_librosa_load(oracle_ckpt, oracle_fixture, stem):
    ref = oracle_fixture("audio", stem)
    path = oracle_ckpt / "clips" / f"{stem}.wav"

    native, sr = load_audio(path)
    assert sr == ref["native_sr"]
    assert native.dtype == np.float32 and native.ndim == 1
    np.testing.assert_allclose(native, ref["native"].numpy(), rtol=0, atol=ATOL)

    wav24 = load_wav_24k(path)
    assert wav24.dtype == np.float32
    assert wav24.shape == ref["wav24"].shape
    np.testing.assert_allclose(wav24, ref["wav24"].numpy(), rtol=0, atol=ATOL)


def _write(path, wav, sr, subtype=None):
    sf.write(path, wav, sr, subtype=subtype)
    return path


@pytest.mark.parametrize(
    "name, sr, channels, subtype, seconds",
    [
        ("stereo_8k.wav", 8000, 2, "PCM_16", 1.3),
        ("mono_48k_float.wav", 48000, 1, "FLOAT", 1.1),
        ("three_ch_22k.flac", 22050, 3, "PCM_24", 0.7),
        ("mono_44k.ogg", 44100, 1, "VORBIS", 0.9),
        ("short_0p1s_24k.wav", 24000, 1, "FLOAT", 0.1),
    ],
)
def test_formats_match_librosa(tmp_path, name, sr, channels, subtype, seconds):
    librosa = pytest.importorskip("librosa")  # test-only dependency
    mono = speech_like(seconds, sr, seed=11)
    wav = mono if channels == 1 else np.stack([mono * (0.5 + 0.2 * c) for c in range(channels)], axis=1)
    path = _write(tmp_path / name, wav, sr, subtype)

    ours, our_sr = load_audio(path)
    theirs, their_sr = librosa.load(path, sr=None)
    assert our_sr == their_sr == sr
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)

    ours24 = load_wav_24k(path)
    theirs24, _ = librosa.load(path, sr=24000)
    # librosa's length is ceil(L * (24000 / sr)) in floats (the 0.9 s vorbis file, L = 39690, gives 21601, not the
    # exact 21600): the float expression is part of the contract. len(theirs): vorbis may add samples.
    assert ours24.shape == theirs24.shape == (int(np.ceil(len(theirs) * (24000 / sr))),)
    np.testing.assert_allclose(ours24, theirs24, rtol=0, atol=ATOL)


def test_short_clip_goes_through(tmp_path):
    path = _write(tmp_path / "short.wav", speech_like(0.1, 24000, seed=3), 24000, "FLOAT")
    wav = load_wav_24k(path)
    assert wav.shape == (2400,)
    assert s3gen_mel(torch.from_numpy(wav)).shape == (1, 80, 5)


def test_arrays(tmp_path):
    x = speech_like(0.5, 16000, seed=2)
    stereo = np.stack([x, 0.5 * x])  # (channels, L), librosa's layout
    y, sr = load_audio(stereo, source_sr=16000)
    assert sr == 16000
    np.testing.assert_array_equal(y, stereo.mean(axis=0))
    y24, sr24 = load_audio(torch.from_numpy(x), 24000, source_sr=16000)
    assert sr24 == 24000 and y24.shape == (12000,)
    with pytest.raises(TypeError, match="source_sr"):
        load_audio(x)
    with pytest.raises(TypeError, match="floating point"):
        load_audio((x * 32767).astype(np.int16), source_sr=16000)
    with pytest.raises(TypeError, match="path or a float array"):
        load_audio(12345)
    for bad in (16000.5, float("nan"), "16000", True):
        with pytest.raises(ValueError, match="whole number of Hz"):
            load_audio(x, source_sr=bad)
    assert load_audio(x, source_sr=16000.0)[1] == 16000


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(ValueError, match="not a file"):
        load_audio(tmp_path)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(ValueError, match="cannot read"):
        load_audio(path)


def test_empty_audio(tmp_path):
    path = _write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000, "FLOAT")
    with pytest.raises(ValueError, match="empty"):
        load_audio(path)
    with pytest.raises(ValueError, match="empty"):
        load_audio(np.zeros(0, dtype=np.float32), source_sr=16000)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, bad):
    x = speech_like(0.2, 16000, seed=4)
    x[100] = bad
    path = _write(tmp_path / "bad.wav", x, 16000, "FLOAT")
    with pytest.raises(ValueError, match="NaN or inf"):
        load_audio(path)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_wav_24k(x, source_sr=16000)


def test_digital_silence(tmp_path):
    path = _write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000, "PCM_16")
    with pytest.raises(ValueError, match="silence"):
        load_wav_24k(path)
    wav = load_wav_24k(path, allow_silent=True)
    assert wav.shape == (24000,) and not wav.any()
    # a stereo file whose channels cancel is silent after the down-mix
    x = speech_like(0.2, 16000, seed=5)
    with pytest.raises(ValueError, match="silence"):
        load_audio(np.stack([x, -x]), source_sr=16000)
