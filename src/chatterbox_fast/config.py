"""Frozen configs. Defaults are the released English Chatterbox model (spec §2.1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class T3Config:
    """T3: text ids -> 25 Hz speech tokens. A Llama_520M backbone fed with custom embeddings."""

    # vocabularies and learned position tables
    text_vocab_size: int = 704  # English tokenizer.json (multilingual: 2454)
    speech_vocab_size: int = 8194  # 6561 speech codes + SOS/EOS + never-trained ids
    max_text_tokens: int = 2048  # text_pos_emb has max_text_tokens + 2 rows (SOT/EOT)
    max_speech_tokens: int = 4096  # speech_pos_emb has max_speech_tokens + 4 rows
    start_text: int = 255
    stop_text: int = 0
    start_speech: int = 6561
    stop_speech: int = 6562

    # Llama backbone
    dim: int = 1024
    n_layers: int = 30
    n_heads: int = 16  # no GQA: 16 kv heads too
    head_dim: int = 64
    intermediate_size: int = 4096  # SwiGLU hidden size
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    # llama3 RoPE scaling (changes 17 of 32 frequencies)
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    llama_vocab_size: int = 8  # dummy `tfmr.embed_tokens`, present in the checkpoint, never used

    # conditioning encoder
    speaker_embed_size: int = 256  # VoiceEncoder d-vector
    prompt_len: int = 150  # max speech-prompt tokens (6 s at 25 Hz)
    perceiver_queries: int = 32
    perceiver_heads: int = 4
    perceiver_norm_eps: float = 1e-5

    @property
    def text_pos_size(self) -> int:
        return self.max_text_tokens + 2

    @property
    def speech_pos_size(self) -> int:
        return self.max_speech_tokens + 4

    @property
    def cond_len(self) -> int:
        """Conditioning positions: speaker (1) + perceiver (32) + exaggeration (1)."""
        return 1 + self.perceiver_queries + 1

    @classmethod
    def tiny(cls, **overrides) -> "T3Config":
        """A small config with the real structure, for fast tests."""
        base = dict(
            text_vocab_size=704, speech_vocab_size=8194, dim=64, n_layers=2, n_heads=4, head_dim=16,
            intermediate_size=128, max_text_tokens=256, max_speech_tokens=512, perceiver_heads=4,
            speaker_embed_size=256,
        )
        base.update(overrides)
        return cls(**base)
