"""TextTokenizer vs the reference EnTokenizer (identical ids for every case), validation and [UNK] handling."""

from __future__ import annotations

import logging

import pytest
import torch

from chatterbox_fast.constants import MAX_TEXT_TOKENS, START_TEXT, STOP_TEXT
from chatterbox_fast.text import EncodedText, TextTokenizer, validate_text
from dumps.text import CASES

IDX = range(len(CASES))
IDS = [repr(c[:24]) for c in CASES]


@pytest.fixture(scope="module")
def ref(oracle_fixture):
    data = oracle_fixture("text", "text")
    assert data["cases"] == CASES, "fixture is stale: rebuild the 'text' dump"
    return data


@pytest.fixture(scope="module")
def tok(oracle_ckpt):
    return TextTokenizer.from_file(oracle_ckpt / "tokenizer.json")


def _public_ok(text: str) -> bool:
    """Whether the public API accepts `text` (mirrors the documented rules, written independently)."""
    if not text.strip():
        return False
    return not any((ord(c) < 32 and c not in "\n\t\r") or 127 <= ord(c) < 160 for c in text)


def test_constants_match_reference(ref, tok):
    assert (ref["start_text_token"], ref["stop_text_token"]) == (START_TEXT, STOP_TEXT)
    assert ref["max_text_tokens"] == MAX_TEXT_TOKENS
    assert tok.tokenizer.get_vocab()["[START]"] == ref["special"]["[START]"]
    assert tok.unk_id == ref["special"]["[UNK]"]


@pytest.mark.parametrize("i", IDX, ids=IDS)
def test_encode_normalised_matches_reference(ref, tok, i):
    assert tok.encode(ref["normalized"][i]) == ref["ids"][i]


@pytest.mark.parametrize("i", IDX, ids=IDS)
def test_encode_raw_matches_reference(ref, tok, i):
    assert tok.encode(CASES[i]) == ref["raw_ids"][i]


@pytest.mark.parametrize("i", IDX, ids=IDS)
def test_text_to_ids_matches_reference(ref, tok, i):
    ids = tok.text_to_ids(ref["normalized"][i], max_text_tokens=10**9)
    assert ids.dtype == torch.long and ids.shape == (1, len(ref["full_ids"][i]))
    assert ids[0].tolist() == ref["full_ids"][i]


@pytest.mark.parametrize("i", IDX, ids=IDS)
def test_prepare_matches_reference_or_rejects(ref, tok, i):
    text = CASES[i]
    n = len(ref["ids"][i])
    if not _public_ok(text) or n > MAX_TEXT_TOKENS:
        with pytest.raises(ValueError):
            tok.prepare(text)
        return
    enc = tok.prepare(text)
    assert isinstance(enc, EncodedText)
    assert enc.text == ref["normalized"][i]
    assert enc.ids[0].tolist() == ref["full_ids"][i]
    assert enc.num_text_tokens == n
    assert len(enc.unknown) == ref["ids"][i].count(ref["special"]["[UNK]"]) - enc.text.count("[UNK]")


def test_some_cases_cover_each_rule(ref):
    """The fixture really exercises rejection paths (guards against a fixture that silently lost its hard cases)."""
    assert sum(not c.strip() for c in CASES) >= 3
    assert any(len(ids) > MAX_TEXT_TOKENS for ids in ref["ids"])
    assert any(1 in ids for ids in ref["ids"])


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [None, b"abc", 12, ["a"]])
def test_type_errors(tok, bad):
    for fn in (tok.encode, tok.text_to_ids, tok.prepare, validate_text):
        with pytest.raises(TypeError, match="str"):
            fn(bad)


@pytest.mark.parametrize("text", ["", " ", "   ", "\t\n\r", "\u3000\xa0"])
def test_empty_or_whitespace_rejected(tok, text):
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        validate_text(text)
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        tok.prepare(text)


@pytest.mark.parametrize("ch", ["\x00", "\x07", "\x0b", "\x0c", "\x1b", "\x7f", "\x85"])
def test_control_chars_rejected(tok, ch):
    with pytest.raises(ValueError, match=f"control character U\\+{ord(ch):04X} at index 5"):
        validate_text("hello" + ch + "world")
    with pytest.raises(ValueError, match="control character"):
        tok.prepare("hello" + ch + "world")


def test_allowed_whitespace_controls(tok):
    validate_text("line one\nline\ttwo\r\n")
    assert tok.prepare("line one\nline\ttwo\r\n").text == "Line one line two."


def test_too_long_names_limit_and_count(ref, tok):
    i = max(IDX, key=lambda j: len(ref["ids"][j]))
    n = len(ref["ids"][i])
    assert n > MAX_TEXT_TOKENS
    msg = f"{n} text tokens.*limit is {MAX_TEXT_TOKENS}"
    with pytest.raises(ValueError, match=msg):
        tok.prepare(CASES[i])
    with pytest.raises(ValueError, match=msg):
        validate_text(CASES[i], tok)
    validate_text(CASES[i])  # without a tokenizer only the character checks run
    assert tok.prepare(CASES[i], max_text_tokens=n).num_text_tokens == n


def test_text_to_ids_limit_boundary(tok):
    text = "x" * MAX_TEXT_TOKENS
    assert len(tok.encode(text)) == MAX_TEXT_TOKENS  # precondition: one id per "x"
    assert tok.text_to_ids(text).shape == (1, MAX_TEXT_TOKENS + 2)
    with pytest.raises(ValueError, match=f"{MAX_TEXT_TOKENS + 1} text tokens.*limit is {MAX_TEXT_TOKENS}"):
        tok.text_to_ids(text + "x")


def test_text_to_ids_keeps_reference_behaviour_on_empty(tok):
    assert tok.text_to_ids("")[0].tolist() == [START_TEXT, STOP_TEXT]


# ----------------------------------------------------------------------------------------------- unknowns
def test_unknown_chars_counted_and_logged(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="chatterbox_fast.text.tokenizer"):
        enc = tok.prepare("Emoji 😀 test 🎉 and 😀 again")
    assert enc.unknown == ("😀", "🎉", "😀")
    assert enc.ids[0].tolist().count(tok.unk_id) == 3
    assert "3 character(s)" in caplog.text and "😀🎉" in caplog.text


def test_no_unknowns_no_warning(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="chatterbox_fast.text.tokenizer"):
        enc = tok.prepare("Plain ASCII text, nothing odd.")
    assert enc.unknown == () and caplog.text == ""


def test_literal_unk_token_not_counted(tok):
    assert tok.unknown_chars("a [UNK] b") == ()
    assert tok.unknown_chars("日本 [UNK] é") == ("日", "本")


# ----------------------------------------------------------------------------------------------- loading
def test_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        TextTokenizer.from_file(tmp_path / "nope.json")


def test_from_file_malformed(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        TextTokenizer.from_file(p)


def test_from_file_without_start_stop(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    p = tmp_path / "tokenizer.json"
    Tokenizer(BPE(vocab={"[UNK]": 0, "a": 1}, merges=[], unk_token="[UNK]")).save(str(p))
    with pytest.raises(ValueError, match=r"\['\[START\]', '\[STOP\]'\]"):
        TextTokenizer.from_file(p)
