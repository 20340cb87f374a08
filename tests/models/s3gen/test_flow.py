"""S3Gen flow (speech tokens + prompt -> mel) against the reference (tests/reference/dumps/s3gen_flow.py).

Same random weights, fp32, same injected CFM noise. Our kernels sum in a different order from the reference
(im2col GEMMs instead of mkldnn convolutions, SDPA, or on an AVX-512 CPU our own attention kernel, instead of
matmul + softmax), so values agree to float rounding
only. Tolerances (abs) are ~10x the largest errors measured on a 2-core x86 CPU (torch 2.13):
  encoder output h / mu : measured <= 2.1e-6 (|h| ~ 5, |mu| ~ 3), up to 2024 frames   -> 2e-5
  one estimator call    : measured <= 8.2e-6 (|v| ~ 4), up to 1000 frames              -> 1e-4
  final mel (10 steps)  : measured <= 4.9e-6 (|mel| ~ 6)                                -> 5e-5 (issue: <= 1e-4)

Runs single-threaded (module fixture): on a loaded 2-core machine two OpenMP threads spin-wait on each other and the
estimator gets ~10x slower.
"""

from __future__ import annotations

import pytest
import torch

from chatterbox_fast.models.s3gen import FLOW_KEYMAP, FlowConfig, S3GenFlow
from chatterbox_fast.models.s3gen.encoder import ConformerEncoderConfig, espnet_rel_pos_table, rel_shift
from chatterbox_fast.models.s3gen.estimator import EstimatorConfig
from chatterbox_fast.weights import CheckpointError, load_strict, read_safetensors
from helpers import spec_keys

torch.set_grad_enabled(False)

DUMP = "s3gen_flow"
TOL_ENC = 2e-5  # encoder output h and mu
TOL_VEL = 1e-4  # one estimator call
TOL_MEL = 5e-5  # final mel

FULL = ["p05_n1", "p05_n2", "p05_n25", "p052_n25", "p052_b2"]  # p05_n25 also keeps every step's velocity
STEP0 = ["conds_n25", "p6s_n25", "p10s_n250"]
ENC_ONLY = ["p05_n1000"]


# --------------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def state(oracle_state):
    return oracle_state("s3gen.safetensors")


@pytest.fixture(scope="module")
def flow(state):
    with torch.device("meta"):
        model = S3GenFlow()
    load_strict(model, state, FLOW_KEYMAP, name="s3gen.safetensors")
    return model.eval()


@pytest.fixture(scope="module")
def flow_fast(state):
    """The flow with the engine's inference layout (tap-major convs, fused q/k/v GEMMs)."""
    with torch.device("meta"):
        model = S3GenFlow()
    load_strict(model, state, FLOW_KEYMAP, name="s3gen.safetensors")
    assert model.decoder.estimator.inference_layout_()
    return model.eval()


@pytest.fixture(scope="module")
def prompts(oracle_fixture):
    return oracle_fixture(DUMP, "prompts")


def _prompt_args(prompts, case) -> dict:
    p = prompts[case["prompt"]]
    return {"prompt_token": p["prompt_token"], "prompt_feat": p["prompt_feat"], "embedding": p["embedding"]}


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------- weights/keys
def test_module_keys_match_spec_exactly():
    with torch.device("meta"):
        model = S3GenFlow()
    ours = {"flow." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == spec_keys("s3gen", "flow.")
    assert len(ours) == 1121


def test_every_flow_key_of_the_file_is_consumed(state, flow):
    file_keys = {k for k in state if k.startswith("flow.")}
    assert file_keys == {"flow." + k for k in flow.state_dict()}
    assert all(not k.endswith("num_batches_tracked") for k in file_keys)
    assert all(v.device.type == "cpu" and not v.is_meta for v in flow.state_dict().values())


def test_strict_load_names_a_missing_key(state):
    broken = {k: v for k, v in state.items() if k != "flow.decoder.estimator.mid_blocks.3.1.2.attn1.to_k.weight"}
    with torch.device("meta"):
        model = S3GenFlow()
    with pytest.raises(CheckpointError, match=r"missing: decoder\.estimator\.mid_blocks\.3\.1\.2\.attn1\.to_k"):
        load_strict(model, broken, FLOW_KEYMAP, name="s3gen.safetensors")


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", FULL + STEP0 + ENC_ONLY)
def test_encoder_and_mu(flow, prompts, oracle_fixture, name):
    case = oracle_fixture(DUMP, name)
    p = prompts[case["prompt"]]
    b = case["tokens"].shape[0]
    tokens = torch.cat([p["prompt_token"].expand(b, -1), case["tokens"]], dim=1)
    lens = None if "lens" not in case else case["lens"] + p["prompt_token"].shape[1]
    h, mu, h_lens = flow.encode(tokens, lens)
    assert h.shape[1] == 2 * tokens.shape[1]
    err_h, err_mu = _maxerr(h, case["h"]), _maxerr(mu, case["mu"])
    assert err_h <= TOL_ENC and err_mu <= TOL_ENC, f"{name}: h {err_h:.2e}, mu {err_mu:.2e}"
    if lens is not None:
        assert torch.equal(h_lens, 2 * lens)


@pytest.mark.parametrize(
    "name, with_mask", [("p05_n25", True), ("p05_n25", False)] + [(n, False) for n in STEP0]
)
def test_estimator_step0(flow, oracle_fixture, name, with_mask):
    """One estimator call on the reference's own step-0 inputs (cond + uncond rows); mask=None is our B=1 path."""
    c = oracle_fixture(DUMP, name)
    mask = c["mask_in"] if with_mask else None
    v = flow.decoder.estimator(c["x_in"], mask, c["mu_in"], c["t_in"], c["spks_in"], c["cond_in"])
    err = _maxerr(v, c["v"][0])
    assert err <= TOL_VEL, f"{name}: velocity max abs err {err:.2e}"


def _run_recording(flow, monkeypatch, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    est = flow.decoder.estimator
    orig = est.forward_packed
    steps: list[torch.Tensor] = []

    def rec(*a, **k):
        v = orig(*a, **k)
        steps.append(v.transpose(1, 2).clone())  # (2B, 80, T) like the reference
        return v

    monkeypatch.setattr(est, "forward_packed", rec)
    mel = flow.inference(**kwargs)
    monkeypatch.undo()
    return mel, steps


def test_each_cfm_step_velocity(flow, prompts, oracle_fixture, monkeypatch):
    c = oracle_fixture(DUMP, "p05_n25")
    mel, steps = _run_recording(flow, monkeypatch, speech_tokens=c["tokens"], noise=c["noise"], **_prompt_args(prompts, c))
    assert len(steps) == 10 == c["v"].shape[0]
    errs = [_maxerr(ours, ref) for ours, ref in zip(steps, c["v"])]
    assert max(errs) <= TOL_VEL, f"per-step velocity max abs errors: {[f'{e:.1e}' for e in errs]}"
    assert list(mel.shape) == c["mel_shape"]
    err = _maxerr(mel, c["mel"])
    assert err <= TOL_MEL, f"mel max abs err {err:.2e}"


def _check_final_mel(flow, prompts, c, name) -> None:
    kwargs = _prompt_args(prompts, c)
    if "lens" in c:
        kwargs["speech_token_lens"] = c["lens"]
    mel = flow.inference(c["tokens"], noise=c["noise"], **kwargs)
    assert list(mel.shape) == c["mel_shape"]
    err = _maxerr(mel, c["mel"])
    assert err <= TOL_MEL, f"{name}: mel max abs err {err:.2e}"


@pytest.mark.parametrize("name", [n for n in FULL if n != "p05_n25"])  # p05_n25: test_each_cfm_step_velocity
def test_final_mel(flow, prompts, oracle_fixture, name):
    _check_final_mel(flow, prompts, oracle_fixture(DUMP, name), name)


def test_output_lengths_match_reference(flow, prompts, oracle_fixture, monkeypatch):
    """Every (prompt, n tokens) pair of the dump, estimator stubbed to zeros on both sides: T - P frames exactly."""
    est = flow.decoder.estimator
    monkeypatch.setattr(est, "forward_packed", lambda h, *a, **k: h.new_zeros(h.shape[0], h.shape[1], 80))
    cases = oracle_fixture(DUMP, "lengths")["cases"]
    assert len(cases) >= 20
    for c in cases:
        p = prompts[c["prompt"]]
        tokens = torch.zeros(1, c["n"], dtype=torch.long)
        mel = flow.inference(tokens, noise=None, generator=torch.Generator().manual_seed(0), **_prompt_args(prompts, c))
        expected = 2 * (p["prompt_token"].shape[1] + c["n"]) - p["prompt_feat"].shape[1]
        assert list(mel.shape) == c["mel_shape"] == [1, 80, expected], c


# ---------------------------------------------------------------------------------------- randomness / API
def test_global_rng_draws_the_reference_noise(flow, prompts, oracle_fixture):
    """No noise, no generator: the global RNG draws what the reference's randn_like drew (seed 1000 + token seed)."""
    c = oracle_fixture(DUMP, "p05_n2")
    torch.manual_seed(1000 + 12)
    mel = flow.inference(c["tokens"], **_prompt_args(prompts, c))
    assert _maxerr(mel, c["mel"]) <= TOL_MEL


# ------------------------------------------------------------------------ no-oracle unit tests (tiny model)
def _tiny_flow(seed: int = 0) -> S3GenFlow:
    cfg = FlowConfig(
        input_size=64,
        encoder=ConformerEncoderConfig(d_model=64, n_heads=2, ffn_dim=128, n_blocks=1, n_up_blocks=1),
        estimator=EstimatorConfig(channels=32, n_blocks=1, num_mid_blocks=1, num_heads=2, head_dim=16, time_embed_dim=64),
        n_timesteps=3,
    )
    torch.manual_seed(seed)
    model = S3GenFlow(cfg)
    for p in model.parameters():  # the module leaves its parameters uninitialised (they come from a checkpoint)
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _tiny_inputs(np_: int = 4, ng: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "speech_tokens": torch.randint(0, 6561, (1, ng), generator=g),
        "prompt_token": torch.randint(0, 6561, (1, np_), generator=g),
        "prompt_feat": torch.randn(1, 2 * np_ + 1, 80, generator=g),
        "embedding": torch.randn(1, 192, generator=g),
        "generator": torch.Generator().manual_seed(2),
    }


def test_rel_shift_indexes_query_minus_key():
    t = 5
    raw = torch.randn(2, 3, t, 2 * t - 1)
    out = rel_shift(raw)
    for i in range(t):
        for j in range(t):
            assert torch.equal(out[..., i, j], raw[..., i, t - 1 - (i - j)])
    table = espnet_rel_pos_table(t, 8)
    # row k encodes distance t-1-k: row t-1 is distance 0 -> sin(0)=0, cos(0)=1
    assert torch.equal(table[0, t - 1, 0::2], torch.zeros(4)) and torch.equal(table[0, t - 1, 1::2], torch.ones(4))


def test_tiny_output_shape_and_determinism():
    model = _tiny_flow()
    a = model.inference(**_tiny_inputs())
    b = model.inference(**_tiny_inputs())
    assert a.shape == (1, 80, 2 * (4 + 5) - 9)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_tiny_generator_and_injected_noise_agree():
    model = _tiny_flow()
    kw = _tiny_inputs()
    a = model.inference(**kw)  # generator seeded with 2
    kw.pop("generator")
    b = model.inference(**kw, noise=torch.randn(1, 80, 18, generator=torch.Generator().manual_seed(2)))
    other = model.inference(**kw, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)


def test_tiny_batch_rows_match_single_rows():
    """A full-length batch of 2 (one CFG batch of 4) gives each row's single-row result."""
    model = _tiny_flow()
    kw = _tiny_inputs()
    toks = torch.cat([kw["speech_tokens"], kw["speech_tokens"].flip(1)])
    t = 2 * (4 + 5)
    noise = torch.randn(2, 80, t, generator=torch.Generator().manual_seed(3))
    base = {k: v for k, v in kw.items() if k not in ("speech_tokens", "generator")}
    both = model.inference(toks, noise=noise, **base)
    for i in range(2):
        one = model.inference(toks[i : i + 1], noise=noise[i : i + 1], **base)
        assert (both[i : i + 1] - one).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"speech_tokens": torch.tensor([[1, 6561]])}, ValueError, r"outside \[0, 6561\)"),
        ({"speech_tokens": torch.tensor([[-1, 2]])}, ValueError, r"outside \[0, 6561\)"),
        ({"prompt_token": torch.tensor([[7000, 1, 2, 3]])}, ValueError, "prompt_token holds ids outside"),
        ({"speech_tokens": torch.zeros(1, 0, dtype=torch.long)}, ValueError, "empty"),
        ({"speech_tokens": torch.zeros(1, 3)}, TypeError, "integer tensor"),
        ({"speech_tokens": [1, 2, 3]}, TypeError, "torch.Tensor"),
        ({"speech_tokens": torch.zeros(1, 1, 3, dtype=torch.long)}, ValueError, r"shape \(N,\) or \(B, N\)"),
        ({"prompt_feat": torch.zeros(1, 80, 9)}, ValueError, "80 mel bins last"),
        ({"prompt_feat": torch.zeros(1, 9, 80, dtype=torch.long)}, TypeError, "floating-point"),
        ({"prompt_feat": torch.zeros(1, 19, 80)}, ValueError, "give only 18"),
        ({"embedding": torch.zeros(1, 80)}, ValueError, "192"),
        ({"embedding": torch.zeros(1, 1, 192)}, ValueError, "embedding must have shape"),
        ({"noise": torch.zeros(1, 80, 5), "generator": None}, ValueError, r"noise must have shape \(1, 80, 18\)"),
        ({"noise": torch.zeros(1, 80, 18, dtype=torch.int32), "generator": None}, TypeError, "noise must be a floating"),
        ({"speech_token_lens": torch.tensor([6])}, ValueError, r"speech_token_lens must lie in \[1, 5\]"),
        ({"speech_token_lens": torch.tensor([2, 3])}, ValueError, "speech_token_lens must have 1 entries"),
        ({"prompt_feat": torch.zeros(2, 9, 80)}, ValueError, "prompt_feat has batch 2, expected 1 or 1"),
    ],
)
def test_bad_input_is_rejected_clearly(change, exc, needle):
    model = _tiny_flow()
    kw = _tiny_inputs()
    kw.update(change)
    with pytest.raises(exc, match=needle):
        model.inference(**kw)


@pytest.mark.parametrize("name", ["p052_b2", "p05_n25"])
def test_final_mel_with_the_inference_layout(flow_fast, prompts, oracle_fixture, name):
    """The engine's weight layout (ConditionalDecoder.inference_layout_) against the reference, same bounds."""
    c = oracle_fixture(DUMP, name)
    _check_final_mel(flow_fast, prompts, c, name)
    if "x_in" in c:  # one estimator call on the reference's step-0 inputs too
        v = flow_fast.decoder.estimator(c["x_in"], c["mask_in"], c["mu_in"], c["t_in"], c["spks_in"], c["cond_in"])
        assert _maxerr(v, c["v"][0]) <= TOL_VEL
