"""Text front-end: reference-exact normalisation (`punc_norm`) and the tokenizer wrapper."""

from chatterbox_fast.text.normalize import DEFAULT_TEXT, punc_norm
from chatterbox_fast.text.tokenizer import EncodedText, TextTokenizer, validate_text

__all__ = ["DEFAULT_TEXT", "EncodedText", "TextTokenizer", "punc_norm", "validate_text"]
