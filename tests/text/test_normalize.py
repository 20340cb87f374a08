"""punc_norm vs the reference (exact string equality) plus the spec §1.2 quirks stated directly."""

from __future__ import annotations

import pytest

from chatterbox_fast.text import DEFAULT_TEXT, punc_norm
from dumps.text import CASES


@pytest.fixture(scope="module")
def ref(oracle_fixture):
    data = oracle_fixture("text", "text")
    assert data["cases"] == CASES, "fixture is stale: rebuild the 'text' dump"
    return data


@pytest.mark.parametrize("i", range(len(CASES)), ids=[repr(c[:24]) for c in CASES])
def test_matches_reference(ref, i):
    assert punc_norm(CASES[i]) == ref["normalized"][i]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", DEFAULT_TEXT),
        ("   ", "."),
        ("hello", "Hello."),
        (" lower start", "lower start."),  # leading space blocks capitalisation
        ("ßa", "SSa."),  # str.upper gives two characters
        ("a... b", "A,  b."),  # the replacement after the collapse leaves a double space
        ("x - y", "X, y."),
        ("x — y", "X - y."),  # em dash becomes " - " after " - " was already replaced
        ("a ,b", "A,b."),
        ("“q” ‘s’", "\"q\" 's'."),
        ("end;", "End,"),
        ("done!", "Done!"),
        ("dash -", "Dash -"),
        ("trail  \t\n", "Trail."),
    ],
)
def test_quirks(text, expected):
    assert punc_norm(text) == expected


def test_not_idempotent():
    once = punc_norm("a... b")
    assert punc_norm(once) != once  # normalise exactly once: a second pass collapses the double space


@pytest.mark.parametrize("bad", [None, b"bytes", 3, ["a"]])
def test_type_error(bad):
    with pytest.raises(TypeError, match="str"):
        punc_norm(bad)
