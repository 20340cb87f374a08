"""Voice conditionals: what T3 and S3Gen need to speak in a voice (spec §1.1, §3.1, §7.3).

`Conditionals` is saved and loaded in the `conds.pt` format of the reference, so the built-in voice and a user's
voice profile are the same thing. `VoiceConditioner` turns reference audio into `Conditionals`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .audio import io as audio_io
from .audio.mel import kaldi_fbank, s3_tokenizer_log_mel, s3gen_mel
from .audio.resample import resample_sinc_hann, resample_soxr
from .constants import DEC_COND_LEN, ENC_COND_LEN, S3_SR, S3GEN_SR
from .models.s3gen.speech_tokenizer import S3TokenizerV2
from .models.s3gen.xvector import CAMPPlus
from .models.voice_encoder import VoiceEncoder

logger = logging.getLogger(__name__)

MIN_REF_SECONDS = 0.5  # below this the prompt holds too few tokens/frames to condition on


@dataclass(frozen=True)
class T3Cond:
    speaker_emb: Tensor  # (1, 256) VoiceEncoder d-vector, L2-normalised
    prompt_tokens: Tensor  # (1, <=150) long: speech tokens of the first 6 s of the reference (16 kHz)
    exaggeration: float  # emotion / exaggeration scalar fed to T3


@dataclass(frozen=True)
class GenCond:
    prompt_token: Tensor  # (1, Np) long: speech tokens of the (<=10 s) S3Gen prompt
    prompt_feat: Tensor  # (1, P, 80) log-mel of that prompt at 24 kHz, P in {2Np, 2Np+1}
    embedding: Tensor  # (1, 192) CAMPPlus x-vector (not normalised)


@dataclass(frozen=True)
class Conditionals:
    t3: T3Cond
    gen: GenCond

    def to(self, device) -> "Conditionals":
        mv = lambda x: x.to(device)  # noqa: E731
        t3 = replace(self.t3, speaker_emb=mv(self.t3.speaker_emb), prompt_tokens=mv(self.t3.prompt_tokens))
        gen = GenCond(mv(self.gen.prompt_token), mv(self.gen.prompt_feat), mv(self.gen.embedding))
        return Conditionals(t3, gen)

    def with_exaggeration(self, exaggeration: float) -> "Conditionals":
        return Conditionals(replace(self.t3, exaggeration=float(exaggeration)), self.gen)

    # ---- conds.pt (the reference's format) ----------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write a `conds.pt` the reference can load (`Conditionals.load` of chatterbox-tts)."""
        t3 = dict(speaker_emb=self.t3.speaker_emb.cpu(), clap_emb=None,
                  cond_prompt_speech_tokens=self.t3.prompt_tokens.cpu(), cond_prompt_speech_emb=None,
                  emotion_adv=torch.full((1, 1, 1), float(self.t3.exaggeration)))
        g = self.gen
        gen = dict(prompt_token=g.prompt_token.cpu(), prompt_token_len=torch.tensor([g.prompt_token.shape[1]]),
                   prompt_feat=g.prompt_feat.cpu(), prompt_feat_len=None, embedding=g.embedding.cpu())
        parent = Path(path).parent
        if not parent.is_dir():
            raise FileNotFoundError(f"cannot save the voice profile: directory not found: {parent}")
        torch.save({"t3": t3, "gen": gen}, path)

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> "Conditionals":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"voice profile not found: {path}")
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
            t3, gen = d["t3"], d["gen"]
            emo = t3.get("emotion_adv", 0.5)
            return cls(
                T3Cond(speaker_emb=t3["speaker_emb"].float().reshape(1, -1),
                       prompt_tokens=t3["cond_prompt_speech_tokens"].long().reshape(1, -1),
                       exaggeration=float(emo.reshape(-1)[0]) if torch.is_tensor(emo) else float(emo)),
                GenCond(prompt_token=gen["prompt_token"].long().reshape(1, -1),
                        prompt_feat=gen["prompt_feat"].float(),
                        embedding=gen["embedding"].float().reshape(1, -1)),
            )
        except (KeyError, TypeError, AttributeError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is not a Chatterbox voice profile (conds.pt format): {e}") from e


class VoiceConditioner:
    """Reference audio -> Conditionals, exactly as the reference's `prepare_conditionals` (spec §1.1).

    Two resamplers, as the reference: soxr (librosa's soxr_hq) for the T3 prompt and the voice encoder; the
    sinc-Hann resampler (torchaudio's) for the S3Gen prompt tokens and the x-vector.
    """

    def __init__(self, ve: VoiceEncoder, tokenizer: S3TokenizerV2, campplus: CAMPPlus, t3_prompt_len: int = 150):
        self.ve, self.tokenizer, self.campplus = ve, tokenizer, campplus
        self.t3_prompt_len = t3_prompt_len

    @property
    def device(self) -> torch.device:
        return self.ve.proj.weight.device

    @torch.inference_mode()
    def __call__(self, source, exaggeration: float = 0.5, source_sr: int | None = None) -> Conditionals:
        ref24 = audio_io.load_wav_24k(source, source_sr=source_sr)  # (L,) float32 mono, librosa.load(sr=24000)
        if ref24.shape[0] < MIN_REF_SECONDS * S3GEN_SR:
            raise ValueError(f"reference audio is {ref24.shape[0] / S3GEN_SR:.2f} s long; need at least "
                             f"{MIN_REF_SECONDS} s (6-10 s of clean speech works best)")
        if not np.any(np.abs(ref24) > 1e-4):
            raise ValueError("reference audio is silent: need speech to clone a voice")
        ref16 = resample_soxr(ref24, S3GEN_SR, S3_SR)  # the full clip
        gen = self.gen_cond(ref24[:DEC_COND_LEN])
        t3 = self.t3_cond(ref16, exaggeration)
        return Conditionals(t3, gen)

    def gen_cond(self, ref24: np.ndarray) -> GenCond:
        """The reference's `S3Gen.embed_ref` on <= 10 s of 24 kHz audio."""
        dev = self.device
        wav24 = torch.from_numpy(np.ascontiguousarray(ref24)).float().to(dev)[None]  # (1, L)
        feat = s3gen_mel(wav24).transpose(1, 2)  # (1, T_mel, 80)
        wav16 = resample_sinc_hann(wav24, S3GEN_SR, S3_SR)  # (1, L16)
        embedding = self.campplus(kaldi_fbank(wav16[0])[None])  # (1, 192)
        tokens, _ = self.tokenizer.tokenize(s3_tokenizer_log_mel(wav16[0]))  # (1, Nt)
        if feat.shape[1] != 2 * tokens.shape[1]:
            # as the reference: only the tokens are cut; an odd mel length keeps P = 2 Np + 1 frames
            tokens = tokens[:, : feat.shape[1] // 2]
        return GenCond(prompt_token=tokens.long(), prompt_feat=feat, embedding=embedding)

    def t3_cond(self, ref16: np.ndarray, exaggeration: float) -> T3Cond:
        dev = self.device
        wav16 = torch.from_numpy(np.ascontiguousarray(ref16)).float().to(dev)
        tokens, _ = self.tokenizer.tokenize(s3_tokenizer_log_mel(wav16[:ENC_COND_LEN]), max_len=self.t3_prompt_len)
        speaker = self.ve.embeds_from_wav(wav16)  # (1, 256), full clip
        return T3Cond(speaker_emb=speaker, prompt_tokens=tokens.long(), exaggeration=float(exaggeration))
