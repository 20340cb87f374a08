"""S3Gen decoder: speech tokens + voice prompt -> 24 kHz waveform (flow -> mel -> HiFT -> trim-fade), spec §1.7.

Loads the `flow.*` and `mel2wav.*` keys of s3gen.safetensors strictly. The file's other two groups belong to
modules that run when a voice prompt is *prepared*, not here: `tokenizer.*` (S3 speech tokenizer, see
speech_tokenizer.py) and `speaker_encoder.*` (CAMPPlus x-vector, see xvector.py). `S3Gen.from_state` checks that
every key of the file is one of these four groups, so nothing is silently ignored.

Randomness, in the reference's order: the CFM noise (B, 80, 2(Np+Ng)) first, then the HiFT source's phases and
noise. With no tensors and no generator both come from torch's global RNG in that order, so
`torch.manual_seed(s)` reproduces a seeded reference `S3Gen.inference` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...weights import KeyMap, check_file_consumed, load_strict
from .flow import FLOW_KEYMAP, FlowConfig, S3GenFlow
from .hift import HIFT_KEYMAP, HiFTConfig, HiFTGenerator, fold_weight_norm, trim_fade

__all__ = ["S3GenConfig", "S3Gen", "S3GEN_CONSUMED_ELSEWHERE"]

# Key groups of s3gen.safetensors loaded by other modules (voice-prompt preparation), not by S3Gen.
S3GEN_CONSUMED_ELSEWHERE = (KeyMap(prefix="tokenizer."), KeyMap(prefix="speaker_encoder."))


@dataclass(frozen=True)
class S3GenConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    trim_fade: bool = True  # zero the first 20 ms and fade in over the next 20 ms (the reference always does)


class S3Gen(nn.Module):
    """`flow` (tokens -> mel) + `mel2wav` (HiFT, mel -> wav)."""

    def __init__(self, cfg: S3GenConfig = S3GenConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.flow = S3GenFlow(cfg.flow)
        self.mel2wav = HiFTGenerator(cfg.hift)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, torch.Tensor],
        cfg: S3GenConfig = S3GenConfig(),
        *,
        name: str = "s3gen.safetensors",
        dtype: torch.dtype | None = None,
    ) -> S3Gen:
        """Build on the meta device and load `state` strictly (tensors are assigned, not copied).

        Fails with the offending key names if any `flow.*` / `mel2wav.*` key is missing, unexpected or mis-shaped,
        or if the file holds a key outside the four known groups. Move the result with `.to(device)`.
        """
        check_file_consumed(state, (FLOW_KEYMAP, HIFT_KEYMAP, *S3GEN_CONSUMED_ELSEWHERE), name)
        with torch.device("meta"):
            model = cls(cfg)
        load_strict(model.flow, state, FLOW_KEYMAP, name=name, dtype=dtype)
        load_strict(model.mel2wav, state, HIFT_KEYMAP, transform=fold_weight_norm, name=name, dtype=dtype)
        model.mel2wav.init_buffers()
        return model.eval()

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (HiFT's STFT window) after moving or a meta-device build."""
        self.mel2wav.init_buffers()

    def inference(
        self,
        speech_tokens: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        hift_phases: torch.Tensor | None = None,
        hift_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        n_timesteps: int | None = None,
    ) -> torch.Tensor:
        """Speech tokens (Ng,) or (1, Ng) + prompt (see `S3GenFlow.inference`) -> wav (1, 480 (2(Np+Ng) - P)).

        `noise` is the CFM noise (1, 80, 2(Np+Ng)); `hift_phases` (1, 9, 1) and `hift_noise` (1, 9, L) are the
        vocoder source's random inputs (pass both or neither). Whatever is not passed is drawn from `generator`,
        or from the global RNG when it is None, CFM noise first.
        """
        if isinstance(speech_tokens, torch.Tensor) and speech_tokens.dim() == 2 and speech_tokens.shape[0] != 1:
            raise ValueError(f"S3Gen.inference runs one utterance at a time, got a batch of {speech_tokens.shape[0]}")
        mel = self.flow.inference(
            speech_tokens, prompt_token, prompt_feat, embedding,
            noise=noise, generator=generator, n_timesteps=n_timesteps,
        )  # (1, 80, T - P)
        wav, _ = self.mel2wav(mel, hift_phases, hift_noise, generator=generator)  # (1, 480 n_mel)
        return trim_fade(wav) if self.cfg.trim_fade else wav
