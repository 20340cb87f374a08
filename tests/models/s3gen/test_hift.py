"""HiFT vocoder: weight-norm folding, strict key coverage, and fp32 parity with the reference `S3Gen.mel2wav`.

Fixtures: tests/reference/dumps/hift.py. Cases `voiced_*`/`cache_*`/`loud_*` use the checkpoint after the dump's
deterministic `perturb_mel2wav` (the raw random checkpoint has g == ||v||, alpha == 1 and f0 < 1 Hz, which would hide
bugs); `loud_*` also drives the magnitudes past the clip at 100 and the waveform into the 0.99 clamp.

Tolerances (fp32; observed on the oracle's own machine/torch build with the plain Conv1d modules: every error below
is exactly 0, because we run the same ops in the same order and fold weight-norm with torch's own kernel; on a CPU the
vocoder now runs its convolutions channels-last (faster in oneDNN), which only changes float summation order: ~1e-7
on the waveform, well inside these bounds):
  - f0: rtol 1e-5 + atol 1e-4 Hz (5 convs with 1536-4608-term reductions; f0 up to ~300 Hz).
  - source s from the reference f0, waveform from the reference s: atol 1e-5 (s in [-1, 1], wav rms ~0.01).
  - end to end, unvoiced cases: the same 1e-5.
  - end to end, voiced/loud cases: wav 2e-4, s 2e-3. The reference sums h*f0/sr over all 480 T samples with an fp32
    cumsum, so the source amplifies any rounding of f0: on `voiced_t250` a 1-ulp (1e-7 relative) change of f0 moves
    s by 1.6e-4 and wav by 4.4e-5 (max abs); the bounds leave ~5-10x room for f0 rounding from another conv backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from chatterbox_fast.models.s3gen.hift import (
    HIFT_KEYMAP,
    HiFTConfig,
    HiFTGenerator,
    draw_source_noise,
    fold_weight_norm,
    trim_fade,
    trim_fade_window,
)
from chatterbox_fast.weights import CheckpointError, load_strict, map_state
from dumps.hift import CACHE_CASE, CASES, perturb_mel2wav
from helpers import spec_keys

F0_RTOL, F0_ATOL = 1e-5, 1e-4
STAGE_ATOL = 1e-5
VOICED_WAV_ATOL, VOICED_S_ATOL = 2e-4, 2e-3
ALL_CASES = {name: (b, t, seed, pert) for name, b, t, seed, pert in CASES + (CACHE_CASE,)}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _build(state: dict[str, torch.Tensor]) -> HiFTGenerator:
    with torch.device("meta"):
        model = HiFTGenerator(HiFTConfig())
    load_strict(model, state, HIFT_KEYMAP, transform=fold_weight_norm, name="s3gen.safetensors")
    model.init_buffers()
    return model.eval()


@pytest.fixture(scope="module")
def hift_state(oracle_ckpt) -> dict[str, torch.Tensor]:
    """Only the mel2wav.* tensors of the oracle s3gen.safetensors (keeps the 1 GB file out of RAM)."""
    with safe_open(str(oracle_ckpt / "s3gen.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("mel2wav.")}


@pytest.fixture(scope="module")
def models(hift_state) -> dict[str, HiFTGenerator]:
    """weights variant of the dump ("plain", "voiced", "loud") -> model loaded strictly from the oracle checkpoint."""
    return {
        "plain": _build(hift_state),
        "voiced": _build(perturb_mel2wav(hift_state)),
        "loud": _build(perturb_mel2wav(hift_state, loud=True)),
    }


@pytest.fixture(scope="module")
def case(oracle_fixture):
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = oracle_fixture("hift", f"case_{name}")
        return cache[name]

    return get


# ---- weight-norm folding ----


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Conv1d(12, 20, 5, dilation=3), lambda: nn.ConvTranspose1d(20, 12, 11, 5), lambda: nn.Linear(7, 4)],
    ids=["conv", "convtranspose", "linear"],
)
def test_fold_matches_torch_weight_norm(make):
    torch.manual_seed(0)
    mod = weight_norm(make())
    g = mod.parametrizations.weight.original0
    with torch.no_grad():
        g.mul_(torch.rand_like(g) + 0.5)  # g != ||v||: folding must really use g
    state = {k: v.detach() for k, v in mod.state_dict().items()}
    folded = fold_weight_norm(state)
    assert sorted(folded) == ["bias", "weight"]
    assert torch.equal(folded["weight"], mod.weight.detach())  # same kernel: bit-identical
    # independent float64 formula: norm over every dim but 0 (the INPUT channel for ConvTranspose1d)
    v = state["parametrizations.weight.original1"].double()
    norm = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
    expect = state["parametrizations.weight.original0"].double() * v / norm
    assert _max_err(folded["weight"], expect) < 1e-6 * expect.abs().max().item()
    plain = make()
    plain.load_state_dict(folded)
    if isinstance(plain, nn.Linear):
        x = torch.randn(3, 7)
    else:
        x = torch.randn(2, plain.in_channels, 30)
    assert torch.equal(plain(x), mod(x))


def test_fold_rejects_incomplete_pairs():
    g, v = torch.ones(4, 1, 1), torch.randn(4, 3, 5)
    with pytest.raises(CheckpointError, match="incomplete"):
        fold_weight_norm({"a.parametrizations.weight.original0": g})
    with pytest.raises(CheckpointError, match="incomplete"):
        fold_weight_norm({"a.parametrizations.weight.original1": v})
    with pytest.raises(CheckpointError, match="does not match"):
        fold_weight_norm({"a.parametrizations.weight.original0": g[:3], "a.parametrizations.weight.original1": v})


# ---- keys ----


def test_keys_cover_spec():
    """Every mel2wav.* key of the spec key list maps (after folding) onto exactly the model's state_dict."""
    spec = spec_keys("s3gen", "mel2wav.")
    assert len(spec) == 328
    state = {k: torch.empty(shape) for k, shape in spec.items()}
    mapped = map_state(state, HIFT_KEYMAP, fold_weight_norm)
    with torch.device("meta"):
        model = HiFTGenerator()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    # the names mirror the checkpoint: e.g.
    for key in ("conv_pre.weight", "ups.0.weight", "resblocks.3.convs1.1.weight", "activations1.0.alpha"):
        assert any(k.endswith(key) for k in expected), key
    assert expected["ups.0.weight"] == (512, 256, 16)  # ConvTranspose1d: (C_in, C_out, k)


def test_oracle_file_loads_strictly(hift_state, models):
    assert len(hift_state) == 328
    broken = dict(hift_state)
    del broken["mel2wav.resblocks.4.convs2.2.bias"]
    with pytest.raises(CheckpointError, match="resblocks.4.convs2.2.bias"):
        _build(broken)
    extra = dict(hift_state, **{"mel2wav.bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="bogus"):
        _build(extra)
    assert not any(t.is_meta for t in models["plain"].state_dict().values())
    assert not models["plain"].stft_window.is_meta


def test_meta_build_needs_init_buffers(hift_state):
    with torch.device("meta"):
        model = HiFTGenerator()
    load_strict(model, hift_state, HIFT_KEYMAP, transform=fold_weight_norm)
    with pytest.raises(RuntimeError, match="init_buffers"):
        model(torch.zeros(1, 80, 2))


# ---- parity ----


def test_stft_window_and_trim_fade(oracle_fixture, models):
    misc = oracle_fixture("hift", "misc")
    assert torch.equal(models["plain"].stft_window, misc["stft_window"])
    assert torch.equal(trim_fade_window(), misc["trim_fade"])
    out = trim_fade(misc["trim_example_in"])
    assert torch.equal(out, misc["trim_example_out"])
    assert out is not misc["trim_example_in"] and not torch.equal(out, misc["trim_example_in"])
    short = trim_fade(torch.ones(1, 700))  # the reference raises for wavs shorter than 960 samples
    assert torch.equal(short, misc["trim_fade"][:700][None])


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_rng_order_replicates_reference(name, case):
    """Seeding the global RNG (or a generator) as the dump did redraws exactly the reference's phases and noise."""
    d = case(name)
    b, t, seed, _ = ALL_CASES[name]
    torch.manual_seed(seed)
    phases, noise = draw_source_noise(b, 480 * t)
    assert torch.equal(phases, d["phases"]) and torch.equal(noise, d["noise"])
    assert torch.equal(torch.rand(4), d["next_rand"])  # the unused randn is consumed too: stream stays aligned
    gen = torch.Generator().manual_seed(seed)
    phases, noise = draw_source_noise(b, 480 * t, generator=gen)
    assert torch.equal(phases, d["phases"]) and torch.equal(noise, d["noise"])


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_f0_and_source_parity(name, case, models):
    d = case(name)
    model = models[ALL_CASES[name][3]]
    with torch.inference_mode():
        f0 = model.predict_f0(d["mel"])
        s = model.source(d["f0"], d["phases"], d["noise"])  # from the reference f0: isolates the source
    torch.testing.assert_close(f0, d["f0"], rtol=F0_RTOL, atol=F0_ATOL)
    if name.startswith("cache"):
        return  # the reference s of this case has the cache written over its start
    assert _max_err(s, d["s"]) <= STAGE_ATOL


def test_loud_case_reaches_clip_and_clamp(case, models):
    d = case("loud_t19")
    model, seen = models["loud"], {}
    hook = model.conv_post.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    try:
        with torch.inference_mode():
            model.decode(d["mel"], d["s"])
    finally:
        hook.remove()
    assert (seen["x"][:, :9] > math.log(100.0)).float().mean() > 0.05  # magnitude clip active
    assert (d["wav"].abs() >= 0.99).any() and (d["wav"].abs() < 0.99).float().mean() > 0.5  # clamp active


def test_voiced_cases_are_mixed(case):
    for name in ("voiced_b2_t50", "voiced_t250"):
        voiced = (case(name)["f0"] > 10).float().mean().item()
        assert 0.5 < voiced < 0.98, (name, voiced)


def test_synthetic_source_parity(oracle_fixture, models):
    """Hand-made f0 contour (voiced glides, gaps, f0 exactly at the 10 Hz threshold, 300 Hz): harmonics and s."""
    d = oracle_fixture("hift", "source_synthetic")
    from chatterbox_fast.models.s3gen.hift import harmonic_source

    model = models["voiced"]
    up = d["f0"][:, None].repeat_interleave(480, dim=-1)
    with torch.inference_mode():
        harm = harmonic_source(up, d["phases"], d["noise"], model.cfg)
        s = model.source(d["f0"], d["phases"], d["noise"])
    assert _max_err(harm, d["harmonics"]) <= STAGE_ATOL
    assert _max_err(s, d["s"]) <= STAGE_ATOL


@pytest.mark.parametrize("name", ["t1", "t2", "t19", "t50", "b2_t19", "voiced_b2_t50", "loud_t19"])
def test_decode_parity(name, case, models):
    """mel + the reference source s -> waveform."""
    d = case(name)
    with torch.inference_mode():
        wav = models[ALL_CASES[name][3]].decode(d["mel"], d["s"])
    assert wav.shape == (d["mel"].shape[0], 480 * d["mel"].shape[2])
    assert _max_err(wav, d["wav"]) <= STAGE_ATOL


@pytest.mark.parametrize("name", ["t1", "t250", "b2_t19", "voiced_b2_t50", "voiced_t250", "cache_t19", "loud_t19"])
def test_end_to_end_parity(name, case, models):
    """mel + the reference's random draws -> (wav, s), as S3Gen would call it."""
    d = case(name)
    b, t, _, weights = ALL_CASES[name]
    with torch.inference_mode():
        wav, s = models[weights](d["mel"], d["phases"], d["noise"], cache_source=d.get("cache_source"))
    assert wav.shape == (b, 480 * t) and s.shape == (b, 1, 480 * t)
    wav_tol, s_tol = (STAGE_ATOL, STAGE_ATOL) if weights == "plain" else (VOICED_WAV_ATOL, VOICED_S_ATOL)
    assert _max_err(wav, d["wav"]) <= wav_tol
    assert _max_err(s, d["s"]) <= s_tol
    assert wav.abs().max() <= 0.99


def test_generator_draws_are_used(case, models):
    """forward(generator=...) draws like draw_source_noise; seeded global RNG reproduces the reference call."""
    d = case("t2")
    model = models["plain"]
    with torch.inference_mode():
        torch.manual_seed(ALL_CASES["t2"][2])
        wav_global, _ = model(d["mel"])
        wav_gen, _ = model(d["mel"], generator=torch.Generator().manual_seed(ALL_CASES["t2"][2]))
        wav_other, _ = model(d["mel"], generator=torch.Generator().manual_seed(12345))
    assert _max_err(wav_global, d["wav"]) <= STAGE_ATOL
    assert torch.equal(wav_gen, wav_global)
    assert _max_err(wav_other, d["wav"]) > 1e-4  # the randomness really reaches the output


# ---- shapes and bad input ----


@pytest.mark.parametrize("frames", [1, 3])
def test_output_length_random_weights(frames):
    torch.manual_seed(0)
    model = HiFTGenerator().eval()
    mel = torch.randn(2, 80, frames)
    with torch.inference_mode():
        wav, s = model(mel, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (2, 480 * frames) and s.shape == (2, 1, 480 * frames)
    assert HiFTConfig().upsample_factor == 480 and HiFTConfig().num_harmonics == 9


def test_channels_last_convolutions_match_the_modules(models, monkeypatch):
    """On CPU at inference the vocoder's convolutions run as 2-D ones over channels-last memory (faster in oneDNN);
    the same model through the plain Conv1d modules gives the same waveform to float rounding. Both paths are
    really taken (conv2d calls counted)."""
    from chatterbox_fast.models.s3gen import hift as hift_mod

    model = models["voiced"]
    mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(3)) * 2 - 4
    calls = {"n": 0}
    real = hift_mod.F.conv2d

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(hift_mod.F, "conv2d", counting)
    with torch.inference_mode():
        fast, _ = model(mel, generator=torch.Generator().manual_seed(0))
        assert calls["n"] > 30, calls  # conv_pre, 3 x (source down + 4 x 6 resblock convs)
        monkeypatch.setattr(hift_mod, "_channels_last", lambda x: False)
        n = calls["n"]
        plain, _ = model(mel, generator=torch.Generator().manual_seed(0))
        assert calls["n"] == n
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)


def test_bad_input():
    torch.manual_seed(0)
    model = HiFTGenerator().eval()
    mel = torch.randn(1, 80, 2)
    phases, noise = draw_source_noise(1, 960)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(mel.numpy())
    with pytest.raises(TypeError, match="floating"):
        model(mel.long())
    for bad in (torch.randn(80, 2), torch.randn(1, 79, 2), torch.randn(1, 80, 0)):
        with pytest.raises(ValueError, match=r"\(B, 80, T\)"):
            model(bad)
    with pytest.raises(ValueError, match="both"):
        model(mel, phases)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(mel, phases, noise[..., :-1])
    with pytest.raises(ValueError, match="phases must have shape"):
        model(mel, phases[:, :8], noise)
    with pytest.raises(TypeError, match="noise"):
        model(mel, phases, noise.long())
    with pytest.raises(ValueError, match="cache_source"):
        model(mel, phases, noise, cache_source=torch.zeros(1, 1, 961))
    with pytest.raises(ValueError, match="batch, length"):
        draw_source_noise(0, 10)
    with pytest.raises(TypeError):
        trim_fade([0.0, 1.0])


def test_source_depends_on_f0_and_phases():
    """Sanity: the source really depends on f0 (voiced) and on the phases of the overtones."""
    model = HiFTGenerator().eval()
    f0 = torch.full((1, 4), 150.0)
    phases, noise = draw_source_noise(1, 1920, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        s1 = model.source(f0, phases, torch.zeros_like(noise))
        s2 = model.source(f0, phases.roll(1, dims=1), torch.zeros_like(noise))
        s3 = model.source(f0 * 0 + 5.0, phases, torch.zeros_like(noise))
    assert not torch.allclose(s1, s2)
    assert torch.allclose(s3, s3[..., :1].expand_as(s3))  # unvoiced, no noise: constant tanh(bias)
    assert math.isfinite(s1.abs().sum().item())


def test_inplace_snake_is_bit_identical_to_the_reference_formula(monkeypatch):
    """ATen's in-place inference path (where our fused kernel does not run) sums exactly as the reference's formula;
    the kernel itself (a vectorised sin, ~1 ulp) is checked against fp64 in tests/test_cpu_kernels.py."""
    from chatterbox_fast import kernels
    from chatterbox_fast.models.s3gen.hift import Snake

    monkeypatch.setattr(kernels, "elementwise_ready", lambda: False)
    torch.manual_seed(0)
    act = Snake(16)
    with torch.no_grad():
        act.alpha.uniform_(0.2, 3.0)
    x = torch.randn(2, 16, 301) * 4
    with torch.no_grad():
        fast = act(x)  # the in-place inference path
    with torch.enable_grad():
        ref = act(x)  # the reference's op order (autograd-safe path)
    assert torch.equal(fast, ref.detach())
    assert not torch.equal(fast, x)
