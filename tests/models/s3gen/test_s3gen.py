"""S3Gen wrapper (flow + HiFT + trim_fade): strict loading of the whole s3gen.safetensors and one end-to-end call
against the reference's `S3Gen.inference` (dump `s3gen_flow`, case `wav_p05_n25`: 25 tokens, 0.5 s prompt,
torch.manual_seed before the call, so both sides draw the CFM noise and then the HiFT source noise from the global
RNG in the same order).

Tolerance: wav max abs error <= 1e-6, ~10x the measured 9.9e-8 (fp32; |wav| <= 0.04 with these random weights).
"""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast.models.s3gen.s3gen import S3Gen
from chatterbox_fast.weights import CheckpointError, read_safetensors

torch.set_grad_enabled(False)

DUMP = "s3gen_flow"
WAV_TOL = 1e-6  # measured 9.9e-8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def state(oracle_state):
    return oracle_state("s3gen.safetensors")


@pytest.fixture(scope="module")
def s3gen(state):
    return S3Gen.from_state(state)


def test_from_state_consumes_every_key(state, s3gen):
    ours = {"flow." + k for k in s3gen.flow.state_dict()}
    groups = {k.split(".", 1)[0] for k in state}
    assert groups == {"flow", "mel2wav", "tokenizer", "speaker_encoder"}
    assert ours == {k for k in state if k.startswith("flow.")}
    assert not any(p.is_meta for p in s3gen.parameters())
    assert not s3gen.mel2wav.stft_window.is_meta


def test_from_state_rejects_an_unknown_key_group(state):
    with pytest.raises(CheckpointError, match="not consumed by any module: extra.weight"):
        S3Gen.from_state({**state, "extra.weight": torch.zeros(1)})


def test_from_state_names_a_missing_flow_key(state):
    broken = {k: v for k, v in state.items() if k != "flow.encoder.up_encoders.2.self_attn.pos_bias_v"}
    with pytest.raises(CheckpointError, match=r"missing: encoder\.up_encoders\.2\.self_attn\.pos_bias_v"):
        S3Gen.from_state(broken)


def test_inference_matches_reference_wav(s3gen, oracle_fixture):
    c = oracle_fixture(DUMP, "wav_p05_n25")
    p = oracle_fixture(DUMP, "prompts")[c["prompt"]]
    torch.manual_seed(c["seed"])
    wav = s3gen.inference(c["tokens"], p["prompt_token"], p["prompt_feat"], p["embedding"])
    ref = c["wav"]
    assert wav.shape == ref.shape == (1, 480 * (2 * (p["prompt_token"].shape[1] + 25) - p["prompt_feat"].shape[1]))
    err = (wav - ref).abs().max().item()
    assert err <= WAV_TOL, f"wav max abs err {err:.2e}"
    assert torch.equal(wav[:, :480], torch.zeros(1, 480))  # trim_fade: first 20 ms silenced


def test_inference_rejects_a_batch(s3gen):
    with pytest.raises(ValueError, match="one utterance at a time"):
        s3gen.inference(torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                        torch.zeros(1, 4, 80), torch.ones(1, 192))
