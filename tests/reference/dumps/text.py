"""Reference text front-end: `chatterbox.tts.punc_norm` and `EnTokenizer` ids on tricky strings (no weights loaded).

Saved as text.pt: cases (inputs), normalized (punc_norm outputs), ids (EnTokenizer.text_to_tokens of the
normalised text, what generate() tokenises), raw_ids (text_to_tokens of the raw input, for encode on its own),
full_ids (the normalised ids padded with START/STOP the way generate() does) and the special-token ids.
"""

from __future__ import annotations

from pathlib import Path

from dumps._common import save


def long_text() -> str:
    """About 3000 characters mixing words, digits and every punctuation the normaliser touches."""
    base = (
        "the quick brown fox jumps over the lazy dog... then: it rests; “why?” she asks — "
        "‘because’ – he says - it is 42 o'clock , really…  "
    )
    return (base * (3000 // len(base) + 1))[:3000]


CASES: list[str] = [
    "",
    "   ",
    "\t\n ",
    "hello world",
    " hello world",
    "ßtraße ist lang",
    "Hello world.",
    "Is it? Yes!",
    "Wait...",
    "Wait... what",
    "Well… maybe",
    "A - B - C",
    "em—dash and en–dash",
    "“Quoted” and ‘single’ quotes",
    "Note: this; that",
    "a , b ,c",
    "double  spaces   here",
    "tabs\tand\nnewlines\r\nhere",
    "Café naïve résumé Ñandú",
    "Emoji 😀 test 🎉",
    "日本語のテキスト",
    "Numbers 123, 4.56 and 7,890",
    long_text(),
    "ends with dash -",
    "ends with comma,",
    "ends with space and dash - ",
    "Mixed: “hi”… — ok; fine - yes , right...",
    "...leading ellipsis",
    "x",
    ".",
    "?!",
    "über cool",
    "ǆ digraph",
    "ŉ apostrophe n",
    "fine. fine",
    "Hello [SPACE] literal [UNK] and [START]",
    "under_score & ampersand #hash @at",
    "\u00a0nbsp leading",
    "1st place",
    "a.... b",
    "Ellipsis at end…",
    "word - ",
    "quote at end”",
    "semicolon at end;",
    "colon at end:",
    "Zero\u200bwidth",
    "\u3000ideographic space",
    "Tab at end\t",
    "MiXeD CaSe WORDS",
    "hyphen-ated and don't",
    "bell\x07char and nul\x00",
    "end with question?  ",
]


def dump(ckpt: Path, out: Path) -> None:
    import torch.nn.functional as F
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.tokenizers.tokenizer import EnTokenizer
    from chatterbox.tts import punc_norm

    tok = EnTokenizer(str(ckpt / "tokenizer.json"))
    hp = T3Config()
    normalized = [punc_norm(s) for s in CASES]
    ids, raw_ids, full_ids = [], [], []
    for raw, norm in zip(CASES, normalized):
        t = tok.text_to_tokens(norm)  # (1, N) int32
        ids.append(t[0].tolist())
        raw_ids.append(tok.text_to_tokens(raw)[0].tolist())
        t = F.pad(t, (1, 0), value=hp.start_text_token)
        t = F.pad(t, (0, 1), value=hp.stop_text_token)
        full_ids.append(t[0].tolist())
    vocab = tok.tokenizer.get_vocab()
    save(out, "text", {
        "cases": CASES,
        "normalized": normalized,
        "ids": ids,
        "raw_ids": raw_ids,
        "full_ids": full_ids,
        "special": {k: vocab[k] for k in ("[START]", "[STOP]", "[UNK]", "[SPACE]")},
        "start_text_token": hp.start_text_token,
        "stop_text_token": hp.stop_text_token,
        "max_text_tokens": hp.max_text_tokens,
    })
