"""Resamplers vs the reference: soxr_hq (librosa.resample) and torchaudio's sinc-Hann `Resample`.

Tolerances (samples in [-1, 1]):
- resample_soxr: 1e-6. Same soxr library, so the measured error is 0; the margin allows other SIMD paths.
- resample_sinc_hann: 1e-6. Same kernel (float64 built, float32 stored) and the same conv1d; measured 0 on CPU.
  A kernel error (wrong width/rolloff/window) gives errors of 1e-3 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_fast.audio import resample_sinc_hann, resample_soxr
from chatterbox_fast.audio.resample import sinc_hann_kernel
from synth import CLIPS, speech_like

ATOL = 1e-6


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


@pytest.mark.parametrize("stem", sorted(CLIPS))
def test_soxr_24k_to_16k_matches_reference(oracle_fixture, stem):
    ref = oracle_fixture("audio", stem)
    ours = resample_soxr(ref["wav24"].numpy(), 24000, 16000)
    assert ours.dtype == np.float32 and ours.shape == ref["ref16"].shape
    assert _max_err(ours, ref["ref16"]) <= ATOL


@pytest.mark.parametrize("stem", sorted(CLIPS))
def test_sinc_hann_24k_to_16k_matches_reference(oracle_fixture, stem):
    ref = oracle_fixture("audio", stem)
    ours = resample_sinc_hann(ref["wav24"][:240000][None], 24000, 16000)  # embed_ref's (1, L) input
    assert ours.shape == ref["ta16"].shape
    assert _max_err(ours, ref["ta16"]) <= ATOL


def test_sinc_hann_other_rates_match_reference(oracle_fixture):
    cases = oracle_fixture("audio", "resample")
    keys = sorted(k[:-3] for k in cases if k.endswith("_in"))
    assert len(keys) == 28
    for key in keys:
        orig, new, _ = (int(v) for v in key.split("_"))
        ours = resample_sinc_hann(cases[f"{key}_in"], orig, new)
        ref = cases[f"{key}_out"]
        assert ours.shape == ref.shape, key
        assert _max_err(ours, ref) <= ATOL, key


@pytest.mark.parametrize("orig, new", [(24000, 16000), (44100, 24000), (8000, 24000), (48000, 16000), (16000, 22050)])
@pytest.mark.parametrize("length", [1, 5, 1001, 16000])
def test_soxr_matches_librosa(orig, new, length):
    librosa = pytest.importorskip("librosa")  # test-only dependency
    x = speech_like(length / orig + 1e-9, orig, seed=length)[:length]
    x[: min(3, length)] += 0.1  # not silence even for the tiniest inputs
    ours = resample_soxr(x, orig, new)
    theirs = librosa.resample(x, orig_sr=orig, target_sr=new)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert _max_err(ours, theirs) <= ATOL


def test_soxr_multichannel_and_dtypes():
    x = speech_like(0.3, 24000, seed=1)
    two = np.stack([x, 0.5 * x])
    out = resample_soxr(two, 24000, 16000)
    assert out.shape == (2, 4800)
    np.testing.assert_array_equal(out[0], resample_soxr(x, 24000, 16000))
    assert resample_soxr(x.astype(np.float64), 24000, 16000).dtype == np.float64
    assert resample_soxr(x, 16000, 16000) is x  # same rate: untouched, like librosa


def test_soxr_bad_input():
    x = speech_like(0.1, 16000)
    with pytest.raises(TypeError, match="floating point"):
        resample_soxr((x * 1000).astype(np.int16), 16000, 24000)
    with pytest.raises(ValueError, match="NaN or inf"):
        resample_soxr(np.array([0.0, np.nan], dtype=np.float32), 16000, 24000)
    with pytest.raises(ValueError, match="positive"):
        resample_soxr(x, 0, 24000)
    with pytest.raises(TypeError, match="integer"):
        resample_soxr(x, 16000.5, 24000)


def test_sinc_hann_shapes_dtypes_and_cache():
    x = torch.from_numpy(speech_like(0.2, 24000, seed=9))
    y = resample_sinc_hann(x, 24000, 16000)
    assert y.shape == (3200,)
    batch = torch.stack([x, -x, 0.5 * x]).reshape(3, 1, -1)
    yb = resample_sinc_hann(batch, 24000, 16000)
    assert yb.shape == (3, 1, 3200)
    torch.testing.assert_close(yb[1, 0], -y, rtol=0, atol=1e-7)
    y64 = resample_sinc_hann(x.double(), 24000, 16000)
    assert y64.dtype == torch.float64
    assert _max_err(y64, y) <= 1e-6  # float64 run of the float32-stored kernel: same result to fp32 precision
    k1, w1 = sinc_hann_kernel(24000, 16000)
    k2, w2 = sinc_hann_kernel(48000, 32000)  # same reduced ratio 3:2 -> same cached kernel object
    assert k1 is k2 and w1 == w2 == 10 and k1.shape == (2, 1, 23)
    assert resample_sinc_hann(x, 16000, 16000) is x


def test_sinc_hann_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        resample_sinc_hann(np.zeros(10, dtype=np.float32), 24000, 16000)
    with pytest.raises(TypeError, match="floating point"):
        resample_sinc_hann(torch.zeros(10, dtype=torch.int16), 24000, 16000)
    with pytest.raises(TypeError, match="integer"):
        resample_sinc_hann(torch.zeros(10), 22050.5, 16000)


def test_sinc_hann_on_meta_device():
    """Device-agnostic: the kernel follows the input (meta stands in for an accelerator here)."""
    y = resample_sinc_hann(torch.zeros(2, 4801, device="meta"), 24000, 16000)
    assert y.device.type == "meta" and y.shape == (2, 3201)
