"""Text normalisation, token-identical to the reference's `chatterbox.tts.punc_norm` (spec §1.2).

Every quirk is kept on purpose, because the model was trained on text cleaned this way:
- empty text becomes a fixed default sentence; whitespace-only text becomes ".";
- the first character is capitalised *before* whitespace is collapsed, so a leading space blocks it, and
  `str.upper` may return two characters ("ß" -> "SS");
- the replacement passes run after the collapse, so some of them leave double spaces ("a... b" -> "A,  b."),
  which the tokenizer turns into two [SPACE] tokens;
- `punc_norm` is not idempotent (a second pass collapses those double spaces): normalise exactly once.
"""

from __future__ import annotations

DEFAULT_TEXT = "You need to add some text for me to talk."

# Sequential str.replace passes, in the reference's order (the order matters: "..." before "…" before " ,").
PUNC_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("...", ", "),
    ("…", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)

SENTENCE_ENDERS: tuple[str, ...] = (".", "!", "?", "-", ",")


def punc_norm(text: str) -> str:
    """Clean up punctuation the way the reference does before tokenisation (spec §1.2)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if len(text) == 0:
        return DEFAULT_TEXT

    # Capitalise before collapsing whitespace (a leading space blocks it); upper() may give 2 chars.
    if text[0].islower():
        text = text[0].upper() + text[1:]

    text = " ".join(text.split())  # collapse any whitespace run to one space, trims both ends

    for old, new in PUNC_REPLACEMENTS:
        text = text.replace(old, new)

    text = text.rstrip(" ")
    if not text.endswith(SENTENCE_ENDERS):
        text += "."
    return text
