"""Text tokenizer wrapper, id-identical to the reference's `EnTokenizer` (spec §1.3, §6).

The reference replaces every ' ' by the literal added token "[SPACE]" and encodes with the HF `tokenizers`
library; characters outside the vocabulary become [UNK] (one per character). START (255) and STOP (0) are added by
the caller, not by the tokenizer file.

Two levels of API:
- reference-exact: `TextTokenizer.encode` and `text_to_ids` (no normalisation, no rejection of empty text);
- public: `TextTokenizer.prepare` / `validate_text`, which reject what the model cannot sensibly speak
  (empty or whitespace-only text, control characters, more than `MAX_TEXT_TOKENS` ids) with a ValueError, normalise
  once with `punc_norm`, and report the characters that fell back to [UNK].
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Encoding, Tokenizer

from chatterbox_fast.constants import MAX_TEXT_TOKENS, START_TEXT, STOP_TEXT
from chatterbox_fast.text.normalize import punc_norm

logger = logging.getLogger(__name__)

SOT = "[START]"
EOT = "[STOP]"
UNK = "[UNK]"
SPACE = "[SPACE]"
ALLOWED_CONTROL = frozenset("\n\t\r")


@dataclass(frozen=True)
class EncodedText:
    """Result of `TextTokenizer.prepare`."""

    text: str  # the normalised text that was tokenised
    ids: torch.Tensor  # (1, N + 2) int64: START, N text ids, STOP
    unknown: tuple[str, ...]  # characters (in order, with repeats) that were mapped to [UNK]

    @property
    def num_text_tokens(self) -> int:
        """N, the number of text ids without START/STOP."""
        return self.ids.shape[1] - 2


def _check_type(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _check_chars(text: object) -> None:
    """Type, empty/whitespace-only and control-character checks (no tokenizer needed)."""
    _check_type(text)
    if not text.strip():
        raise ValueError("text is empty or whitespace-only; give at least one speakable character")
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cc" and ch not in ALLOWED_CONTROL:
            raise ValueError(
                f"text contains control character U+{ord(ch):04X} at index {i}; "
                "only newline, tab and carriage return are allowed"
            )


def _check_length(n: int, max_text_tokens: int) -> None:
    if n > max_text_tokens:
        raise ValueError(
            f"text is too long: {n} text tokens after normalisation, the limit is {max_text_tokens} "
            "(split it into shorter pieces)"
        )


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer` loaded from the checkpoint's tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in (SOT, EOT) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the required special token(s) {missing}")
        if (vocab[SOT], vocab[EOT]) != (START_TEXT, STOP_TEXT):
            # The model uses the T3 ids 255/0, not the file's; a different file layout means a different model.
            logger.warning(
                "tokenizer has %s=%d and %s=%d; the model uses %d and %d",
                SOT, vocab[SOT], EOT, vocab[EOT], START_TEXT, STOP_TEXT,
            )
        self.tokenizer = tokenizer
        self.unk_id: int | None = vocab.get(UNK)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """Load tokenizer.json; fails with a clear error if it is missing, unreadable or lacks [START]/[STOP]."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on malformed files
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
        return cls(tok)

    def _encode(self, text: str) -> tuple[str, Encoding]:
        """(text with spaces replaced by [SPACE], its Encoding); offsets index the replaced text by character."""
        _check_type(text)
        spaced = text.replace(" ", SPACE)
        return spaced, self.tokenizer.encode(spaced)

    def encode(self, text: str) -> list[int]:
        """Text ids exactly as the reference's `EnTokenizer.encode` (no normalisation, no START/STOP)."""
        return self._encode(text)[1].ids

    def unknown_chars(self, text: str) -> tuple[str, ...]:
        """The characters of `text` that encode to [UNK], in order with repeats (a literal "[UNK]" is not counted)."""
        return self._unknown(*self._encode(text))

    def _unknown(self, spaced: str, enc: Encoding) -> tuple[str, ...]:
        if self.unk_id is None:
            return ()
        spans = (spaced[a:b] for tid, (a, b) in zip(enc.ids, enc.offsets) if tid == self.unk_id)
        return tuple(s for s in spans if s != UNK)

    def text_to_ids(self, text: str, max_text_tokens: int = MAX_TEXT_TOKENS) -> torch.Tensor:
        """(1, N + 2) int64 ids: START, `encode(text)`, STOP. No normalisation: call `punc_norm` once before.

        Raises ValueError if N exceeds `max_text_tokens` (the text position table has max_text_tokens + 2 rows).
        """
        ids = self.encode(text)
        _check_length(len(ids), max_text_tokens)
        return torch.tensor([[START_TEXT, *ids, STOP_TEXT]], dtype=torch.long)

    def prepare(self, text: str, max_text_tokens: int = MAX_TEXT_TOKENS) -> EncodedText:
        """Validate, normalise once (`punc_norm`) and tokenise `text` for the model.

        Raises TypeError for non-str text and ValueError for empty/whitespace-only text, control characters other
        than newline/tab/CR, or more than `max_text_tokens` text ids. Characters outside the vocabulary become
        [UNK] as in the reference; they are returned in `EncodedText.unknown` and logged as a warning.
        """
        _check_chars(text)
        normalised = punc_norm(text)
        spaced, enc = self._encode(normalised)
        _check_length(len(enc.ids), max_text_tokens)
        unknown = self._unknown(spaced, enc)
        if unknown:
            logger.warning(
                "%d character(s) not in the tokenizer vocabulary were mapped to %s: %s",
                len(unknown), UNK, "".join(dict.fromkeys(unknown)),
            )
        ids = torch.tensor([[START_TEXT, *enc.ids, STOP_TEXT]], dtype=torch.long)
        return EncodedText(text=normalised, ids=ids, unknown=unknown)


def validate_text(
    text: object, tokenizer: TextTokenizer | None = None, max_text_tokens: int = MAX_TEXT_TOKENS
) -> None:
    """Raise if `text` is not acceptable public input; return None if it is.

    TypeError: not a str. ValueError: empty or whitespace-only (the reference would speak a default sentence or
    "."), a control character other than newline/tab/CR, or - when `tokenizer` is given - more than
    `max_text_tokens` text ids after normalisation.
    """
    if tokenizer is None:
        _check_chars(text)
    else:
        tokenizer.prepare(text, max_text_tokens)  # type: ignore[arg-type]
