"""Fixtures of the engine tests: the Perth watermarker (test extra) and a short built-in voice for fast runs."""

from __future__ import annotations

import os
import warnings

import pytest

from chatterbox_fast.conditioning import Conditionals, GenCond

IN_CI = os.environ.get("CI", "").lower() == "true"

# S3Gen's cost grows with the prompt: the oracle's built-in voice has a 9.5 s prompt (237 tokens, 475 mel frames),
# which makes each CPU generate() spend ~60 s in the flow. 25 tokens / 50 frames (1 s) keep a generate near 10 s.
SHORT_PROMPT_TOKENS = 25


@pytest.fixture(scope="session")
def perth():
    """The resemble-perth module (`watermark` extra, installed by scripts/install_test_extras.sh).

    Missing: a failure in CI (the test venv must have it), a loud skip elsewhere."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import perth as mod
        if mod.PerthImplicitWatermarker is None:
            raise ImportError("perth.PerthImplicitWatermarker is None (setuptools >= 81?)")
    except Exception as err:  # noqa: BLE001 - perth's own imports fail in several ways
        msg = (f"PERTH WATERMARKER MISSING ({type(err).__name__}: {err}). Run "
               "`bash scripts/install_test_extras.sh .venv`.")
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return mod


def shorten_voice(conds: Conditionals, n_tokens: int = SHORT_PROMPT_TOKENS) -> Conditionals:
    """The same voice with its S3Gen prompt cut to the first `n_tokens` tokens (and their 2 n mel frames)."""
    g = conds.gen
    gen = GenCond(g.prompt_token[:, :n_tokens].contiguous(), g.prompt_feat[:, :2 * n_tokens].contiguous(),
                  g.embedding)
    return Conditionals(conds.t3, gen)


@pytest.fixture(scope="session")
def short_voice(oracle_ckpt) -> Conditionals:
    return shorten_voice(Conditionals.load(oracle_ckpt / "conds.pt"))
