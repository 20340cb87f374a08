"""The Perth watermark, for real: resemble-perth's PerthImplicitWatermarker (the reference's watermarker) applied by
the engine to the final 24 kHz wav, and found again by its detector.

How perth reports detection: `get_watermark(wav, sample_rate)` returns a 0-d float array, the decoder's confidence
clipped to [0, 1] and rounded (`round=True`, the default): 1.0 = watermarked, 0.0 = not; `round=False` gives the
confidence itself, so the decision threshold is 0.5. Perth is deterministic (no randomness in apply or detect).

Tolerance against the reference's watermarked output: 1e-6 abs (the same perth code, weights and soxr
resampler; only numpy (1.26 vs 2.x) and the thread count differ: measured 0 with 2 threads, 1.3e-8 with 1).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from chatterbox_fast import OptimizedChatterboxTTS
from chatterbox_fast.engine import _load_watermarker

torch.set_grad_enabled(False)
SR = 24000
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tts(oracle_ckpt, perth):
    return OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=True)


@pytest.fixture(scope="module")
def detector(perth):
    """A separate PerthImplicitWatermarker, as a user checking a file would build it."""
    return perth.PerthImplicitWatermarker()


def confidence(detector, wav) -> float:
    return float(detector.get_watermark(_np(wav), sample_rate=SR, round=False))


def detected(detector, wav) -> bool:
    return float(detector.get_watermark(_np(wav), sample_rate=SR)) == 1.0


def _np(wav) -> np.ndarray:
    return wav.reshape(-1).numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav).reshape(-1)


def test_engine_loads_perth(tts, perth):
    assert isinstance(tts.watermarker, perth.PerthImplicitWatermarker)


def test_watermark_step_matches_reference(tts, oracle_fixture, detector):
    ref = oracle_fixture("pipeline", "generate")
    before = ref["wav_before_watermark"].float().reshape(1, -1)
    want = ref["wav"].float().reshape(1, -1)  # the reference's generate() output: watermarked
    got = tts._finish(before)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs().max().item()
    changed = (want - before).abs().max().item()
    print(f"watermark vs reference: {got.shape[1]} samples, max abs err {err:.1e} (watermark changes the wav by "
          f"up to {changed:.3f}); confidence {confidence(detector, want):.4f} marked, "
          f"{confidence(detector, before):.4f} before")
    assert changed > 1e-3  # the comparison is not vacuous
    assert err <= 1e-6
    assert detected(detector, got) and not detected(detector, before)


def test_watermark_is_deterministic_and_mild_on_speech_like_audio(tts, detector):
    import synth

    clip = torch.from_numpy(synth.speech_like(3.0, SR, seed=2)).unsqueeze(0)
    a, b = tts._finish(clip), tts._finish(clip)
    assert torch.equal(a, b)
    assert a.shape == clip.shape  # multiples of perth's hop keep their length
    snr = 10 * torch.log10(clip.pow(2).sum() / (a - clip).pow(2).sum()).item()
    c_marked, c_plain = confidence(detector, a), confidence(detector, clip)
    print(f"speech-like 3 s: confidence {c_marked:.4f} marked, {c_plain:.4f} plain; SNR {snr:.1f} dB")
    assert detected(detector, a) and c_marked > 0.9
    assert not detected(detector, clip) and c_plain < 0.3
    assert snr > 10  # measured 16.6 dB: a perturbation, not a different signal


def test_generate_with_watermark_is_detectable(tts, detector, short_voice, monkeypatch):
    """generate(enable_watermark=True): the output is perth's watermark of the plain wav, and it is detected."""
    seen = []
    apply = tts.watermarker.apply_watermark

    def spy(wav, sample_rate, **kw):
        seen.append(wav.copy())
        return apply(wav, sample_rate=sample_rate, **kw)

    monkeypatch.setattr(tts.watermarker, "apply_watermark", spy)
    tts.set_voice(short_voice)
    wav = tts.generate("Is this watermarked?", max_new_tokens=6, seed=0)
    assert len(seen) == 1 and wav.shape == (1, seen[0].size)
    plain = seen[0]
    assert np.array_equal(wav.squeeze(0).numpy(), detector.apply_watermark(plain, sample_rate=SR))
    c_marked, c_plain = confidence(detector, wav), confidence(detector, plain)
    print(f"generate ({wav.shape[1]} samples): confidence {c_marked:.4f} marked, {c_plain:.4f} plain")
    assert detected(detector, wav) and c_marked > 0.9
    assert not detected(detector, plain) and c_plain < 0.3


def test_disabled_watermark_leaves_the_wav_alone(tts, monkeypatch):
    monkeypatch.setattr(tts, "watermarker", None)
    wav = torch.linspace(-0.5, 0.5, 4800).unsqueeze(0)
    assert torch.equal(tts._finish(wav), wav)


@pytest.mark.parametrize("blocked", ["pkg_resources", "torchaudio", "librosa"])
def test_perth_with_a_missing_dependency_names_it(blocked, perth, monkeypatch):
    """perth swallows the ImportError of its watermarker (PerthImplicitWatermarker = None); the hint names it."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("perth", blocked)]:
        monkeypatch.delitem(sys.modules, name)  # perth re-imported fresh; all restored after the test
    monkeypatch.setitem(sys.modules, blocked, None)  # `import <blocked>` raises ImportError
    with pytest.raises(ImportError, match="setuptools<81") as e:
        _load_watermarker()
    assert blocked in str(e.value) and "chatterbox-fast[watermark]" in str(e.value)
