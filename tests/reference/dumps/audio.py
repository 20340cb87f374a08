"""Reference audio front-ends and VoiceEncoder embedding (oracle venv).

For every clip of `clips/` this saves what `ChatterboxTTS.prepare_conditionals` / `S3Gen.embed_ref` compute before
any network runs (librosa load + resamplers, the three Slaney-mel front-ends, the Kaldi fbank of CAMPPlus), plus the
VoiceEncoder embedding. Only the pieces needed are built (no ChatterboxTTS: RAM is shared).

Per clip `<stem>.pt`:
  native (L0,) f32 mono at the file rate, native_sr       librosa.load(sr=None)
  wav24 (L24,) f32                                        librosa.load(sr=24000)       (soxr_hq)
  ref16 (L16,) f32                                        librosa.resample(wav24, 24k->16k)
  ta16 (1, L) f32                                         torchaudio Resample(24k,16k)(wav24[:240000])  (embed_ref)
  s3gen_mel (1, 80, T) f32                                mel_spectrogram(wav24[:240000])               (embed_ref)
  tok_mel_prompt (128, T) f32                             S3Tokenizer.log_mel_spectrogram(ref16[:96000]) (T3 prompt)
  tok_mel_ref (128, T) f32                                S3Tokenizer.log_mel_spectrogram(ta16)          (embed_ref)
  fbank (T, 80) f32                                       Kaldi.fbank(ta16[0][None], num_mel_bins=80)   (raw)
  fbank_cmn (1, T, 80) f32                                xvector.extract_feature(ta16)                 (after CMN)
  trimmed (Lt,) f32, trim_index [start, end]              librosa.effects.trim(ref16, top_db=20)
  ve_mel (T, 40) f32                                      melspectrogram(trimmed, VoiceEncConfig()).T
  ve_embed (1, 256) f32                                   VoiceEncoder.embeds_from_wavs([ref16], 16000)
  ve_n_partials int
Arrays `array_short_0p1s.pt` (0.1 s of speech-like audio) and `array_silence_1s.pt` (zeros) hold the same keys
(less native*), computed from the 24 kHz array.
Plus `filterbanks.pt`: librosa.filters.mel for the three Slaney front-ends (s3gen, tokenizer, ve);
`resample.pt`: torchaudio Resample on noise for other rate pairs and lengths; `fbank_extra.pt`: Kaldi.fbank edge cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._common import save

DEC_COND_LEN = 10 * 24000
ENC_COND_LEN = 6 * 16000


def _voice_encoder(ckpt: Path):
    from safetensors.torch import load_file

    from chatterbox.models.voice_encoder import VoiceEncoder

    ve = VoiceEncoder()
    ve.load_state_dict(load_file(str(ckpt / "ve.safetensors")), strict=True)
    return ve.eval()


def _n_partials(ve, ref16: np.ndarray) -> int:
    import librosa

    from chatterbox.models.voice_encoder.melspec import melspectrogram
    from chatterbox.models.voice_encoder.voice_encoder import get_frame_step, get_num_wins

    trimmed = librosa.effects.trim(ref16, top_db=20)[0]
    n_frames = melspectrogram(trimmed, ve.hp).shape[1]
    return int(get_num_wins(n_frames, get_frame_step(0.5, 1.3, ve.hp), 0.8, ve.hp)[0])


RESAMPLE_PAIRS = ((24000, 16000), (16000, 24000), (44100, 16000), (44100, 24000), (48000, 24000), (8000, 24000),
                  (22050, 16000))


def _resample_cases(ta) -> dict:
    """torchaudio Resample(orig, new) on white noise of awkward lengths, for rate pairs beyond 24k->16k."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for orig, new in RESAMPLE_PAIRS:
        for length in (1, 7, 4801, 24001):
            x = 0.3 * torch.randn(2, length, generator=gen)
            out[f"{orig}_{new}_{length}_in"] = x
            out[f"{orig}_{new}_{length}_out"] = ta.transforms.Resample(orig, new)(x)
    return out


def _fbank_cases(Kaldi) -> dict:
    """Kaldi.fbank on noise with a DC offset, at the minimum length and with other bin counts."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for length, bins in ((400, 80), (559, 80), (560, 80), (16000, 80), (16000, 40), (16000, 23)):
        x = 0.1 * torch.randn(length, generator=gen) + 0.05
        out[f"{length}_{bins}_in"] = x
        out[f"{length}_{bins}_out"] = Kaldi.fbank(x[None], num_mel_bins=bins)
    return out


def _pipeline(wav24: np.ndarray, tokenizer, ve, resample_24_16) -> dict:
    """Everything prepare_conditionals / embed_ref compute from `ref24` before the networks (see module doc)."""
    import librosa

    from chatterbox.models.s3gen.utils.mel import mel_spectrogram
    from chatterbox.models.s3gen.xvector import Kaldi, extract_feature
    from chatterbox.models.voice_encoder.config import VoiceEncConfig
    from chatterbox.models.voice_encoder.melspec import melspectrogram

    ref16 = librosa.resample(wav24, orig_sr=24000, target_sr=16000)
    ref24 = torch.from_numpy(wav24[:DEC_COND_LEN]).float()[None]  # embed_ref: (1, L)
    ta16 = resample_24_16(ref24)
    trimmed, trim_index = librosa.effects.trim(ref16, top_db=20)
    fbank_cmn, _, _ = extract_feature(ta16)
    return {
        "wav24": torch.from_numpy(wav24),
        "ref16": torch.from_numpy(ref16),
        "ta16": ta16,
        "s3gen_mel": mel_spectrogram(ref24),
        "tok_mel_prompt": tokenizer.log_mel_spectrogram(torch.from_numpy(ref16[:ENC_COND_LEN])[None])[0],
        "tok_mel_ref": tokenizer.log_mel_spectrogram(ta16)[0],
        "fbank": Kaldi.fbank(ta16[0].unsqueeze(0), num_mel_bins=80),
        "fbank_cmn": fbank_cmn,
        "trimmed": torch.from_numpy(trimmed),
        "trim_index": [int(i) for i in trim_index],
        "ve_mel": torch.from_numpy(np.ascontiguousarray(melspectrogram(trimmed, VoiceEncConfig()).T)),
        "ve_embed": torch.from_numpy(ve.embeds_from_wavs([ref16], sample_rate=16000)),
        "ve_n_partials": _n_partials(ve, ref16),
    }


def dump(ckpt: Path, out: Path) -> None:
    import sys

    import librosa
    import torchaudio as ta

    from chatterbox.models.s3gen.xvector import Kaldi
    from chatterbox.models.s3tokenizer import S3Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synth import speech_like

    torch.set_grad_enabled(False)
    tokenizer = S3Tokenizer("speech_tokenizer_v2_25hz")  # random weights; only its log-mel front-end is used
    ve = _voice_encoder(ckpt)
    resample_24_16 = ta.transforms.Resample(24000, 16000)  # as s3gen.get_resampler builds it

    save(out, "filterbanks", {
        "s3gen": torch.from_numpy(librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000)),
        "tokenizer": tokenizer._mel_filters.clone(),
        "ve": torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=40, fmin=0, fmax=8000)),
    })
    save(out, "resample", _resample_cases(ta))
    save(out, "fbank_extra", _fbank_cases(Kaldi))

    for path in sorted((ckpt / "clips").glob("*.wav")):
        native, native_sr = librosa.load(path, sr=None)
        wav24, _ = librosa.load(path, sr=24000)  # prepare_conditionals
        d = _pipeline(wav24, tokenizer, ve, resample_24_16)
        save(out, path.stem, {"native": torch.from_numpy(native), "native_sr": int(native_sr), **d})

    # arrays at 24 kHz: a 0.1 s clip (shortest sensible reference) and 1 s of digital silence
    for name, wav24 in (("array_short_0p1s", speech_like(0.1, 24000, seed=7)),
                        ("array_silence_1s", np.zeros(24000, dtype=np.float32))):
        save(out, name, _pipeline(wav24, tokenizer, ve, resample_24_16))
