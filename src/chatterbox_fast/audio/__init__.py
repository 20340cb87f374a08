"""Audio loading, resampling and the feature front-ends of the reference (spec §1.1, §3.2, §3.3, §4, §5)."""

from .io import load_audio, load_wav_24k
from .mel import (
    kaldi_fbank,
    kaldi_mel_banks,
    s3_tokenizer_log_mel,
    s3gen_mel,
    slaney_mel_filterbank,
    voice_encoder_mel,
)
from .resample import resample_sinc_hann, resample_soxr

__all__ = [
    "load_audio",
    "load_wav_24k",
    "resample_soxr",
    "resample_sinc_hann",
    "slaney_mel_filterbank",
    "kaldi_mel_banks",
    "s3gen_mel",
    "s3_tokenizer_log_mel",
    "voice_encoder_mel",
    "kaldi_fbank",
]
