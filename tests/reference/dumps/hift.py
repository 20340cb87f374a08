"""Reference HiFT vocoder (`S3Gen.mel2wav`) on seeded mels: f0, the random phases/noise it drew, source, waveform.

Runs in the ORACLE venv. Builds the reference `S3Gen()` only (not ChatterboxTTS) and loads the oracle checkpoint.

The random checkpoint leaves paths idle: weight-norm g equals ||v|| (folding that ignores g would pass), every Snake
alpha is 1, and the predicted f0 is < 1 Hz (all unvoiced: the sines are multiplied by 0). Cases named `voiced_*`
therefore run on the checkpoint after `perturb_mel2wav` (deterministic, importable from the test venv: torch only),
which scales g, varies alpha and scales the f0 classifier so that f0 is a mix of voiced and unvoiced frames; the
`loud_*` case also lifts the log-magnitudes past the clip at 100 (and the waveform into the 0.99 clamp).

Files (dicts of tensors):
  case_<name>.pt: mel (B,80,T), seed, f0 (B,T), phases (B,9,1), noise (B,9,L) standard normal, harmonics (B,9,L)
                  (SineGen output), s (B,1,L), wav (B,L), next_rand (torch.rand(4) right after the call: shows where the
                  global RNG stream stands), [cache_source (1,1,Lc) for the cache case]
  source_synthetic.pt: f0 (B,T) chosen by hand (threshold edges included), seed, phases, noise, harmonics, s
  misc.pt: stft_window (16,), trim_fade (960,), trim_example_in (2,1500), trim_example_out (2,1500)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dumps._common import save

CASES = (  # name, B, T, seed, weights: "plain" checkpoint | "voiced" = perturb_mel2wav | "loud" = perturb_mel2wav(loud)
    ("t1", 1, 1, 11, "plain"),
    ("t2", 1, 2, 12, "plain"),
    ("t19", 1, 19, 13, "plain"),
    ("t50", 1, 50, 14, "plain"),
    ("t250", 1, 250, 15, "plain"),
    ("b2_t19", 2, 19, 16, "plain"),
    ("voiced_b2_t50", 2, 50, 17, "voiced"),
    ("voiced_t250", 1, 250, 18, "voiced"),
    ("loud_t19", 1, 19, 20, "loud"),
)
CACHE_CASE = ("cache_t19", 1, 19, 19, "voiced")


def make_mel(batch: int, frames: int, seed: int) -> torch.Tensor:
    """Seeded log-mel-like input (B, 80, T), values mostly in -6..2, smoothed a little over time."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = -2.0 + 1.8 * torch.randn(batch, 80, frames + 2, generator=g)
    x = (x[..., :-2] + x[..., 1:-1] + x[..., 2:]) / 3 * 1.5 - 1.0
    return x.clamp(-11.5, 2.5).contiguous()


def _pattern(n: int, i: int, lo: float, hi: float) -> torch.Tensor:
    frac = torch.remainder((torch.arange(n, dtype=torch.float64) + 1) * 0.6180339887498949 + 0.1 * i, 1.0)
    return (lo + (hi - lo) * frac).to(torch.float32)


def perturb_mel2wav(state: dict[str, torch.Tensor], loud: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic edit of the `mel2wav.*` tensors so every vocoder path does real work (see module docstring).

    loud: also raise the conv_post bias of the magnitude bins so that exp(.) passes the clip at 100 and the
    waveform reaches the +-0.99 clamp.
    """
    out = dict(state)
    keys = sorted(k for k in state if k.startswith("mel2wav."))
    for i, k in enumerate(keys):
        v = state[k]
        if k.endswith(".parametrizations.weight.original0"):
            out[k] = v * _pattern(v.numel(), i, 0.7, 1.3).view_as(v)
        elif k.endswith(".alpha"):
            out[k] = _pattern(v.numel(), i, 0.3, 2.0)
    out["mel2wav.f0_predictor.classifier.weight"] = state["mel2wav.f0_predictor.classifier.weight"] * 3000.0
    out["mel2wav.f0_predictor.classifier.bias"] = torch.full_like(state["mel2wav.f0_predictor.classifier.bias"], 40.0)
    if loud:
        bias = state["mel2wav.conv_post.bias"].clone()
        bias[:9] = torch.linspace(0.5, 5.5, 9)
        out["mel2wav.conv_post.bias"] = bias
    return out


class _Recorder:
    """Capture the reference's random draws and intermediates during one `mel2wav.inference` call."""

    def __init__(self, hift):
        import torch.distributions.uniform as uniform_mod

        self.hift, self.uniform_cls = hift, uniform_mod.Uniform
        self.samples: list[torch.Tensor] = []
        self.randn: list[torch.Tensor] = []
        self.out: dict[str, torch.Tensor] = {}

    def __enter__(self):
        orig_sample, orig_randn_like = self.uniform_cls.sample, torch.randn_like
        self._orig = (orig_sample, orig_randn_like)

        def sample(dist, *a, **k):
            t = orig_sample(dist, *a, **k)
            self.samples.append(t)  # the same object: the reference's in-place phi_1 = 0 shows here too
            return t

        def randn_like(x, *a, **k):
            t = orig_randn_like(x, *a, **k)
            self.randn.append(t.clone())
            return t

        self.uniform_cls.sample, torch.randn_like = sample, randn_like
        self.hooks = [
            self.hift.f0_predictor.register_forward_hook(lambda m, i, o: self.out.__setitem__("f0", o.clone())),
            self.hift.m_source.l_sin_gen.register_forward_hook(
                lambda m, i, o: self.out.__setitem__("harmonics", o[0].clone())
            ),
        ]
        return self

    def __exit__(self, *exc):
        self.uniform_cls.sample, torch.randn_like = self._orig
        for h in self.hooks:
            h.remove()


def _run_case(hift, batch: int, frames: int, seed: int, cache_source: torch.Tensor | None = None) -> dict:
    mel = make_mel(batch, frames, seed)
    length = 480 * frames
    torch.manual_seed(seed)
    with _Recorder(hift) as rec, torch.inference_mode():
        if cache_source is None:
            wav, s = hift.inference(speech_feat=mel)
        else:
            wav, s = hift.inference(speech_feat=mel, cache_source=cache_source)
    next_rand = torch.rand(4)
    assert len(rec.samples) == 1 and len(rec.randn) == 2, (len(rec.samples), len(rec.randn))
    phases = rec.samples[0].clone()
    noise = rec.randn[0]
    assert phases.shape == (batch, 9, 1) and bool((phases[:, 0] == 0).all())
    assert noise.shape == (batch, 9, length) and rec.randn[1].shape == (batch, length, 1)
    # The stream is rand(B,9,1), randn(B,9,L), randn(B,L,1): redraw it to prove the order stated in the spec.
    torch.manual_seed(seed)
    u = torch.rand(batch, 9, 1)
    low, high = torch.tensor(-math.pi), torch.tensor(math.pi)  # torch's Uniform(-pi, pi).sample
    assert torch.equal((low + u * (high - low))[:, 1:], phases[:, 1:])
    assert torch.equal(torch.randn(batch, 9, length), noise)
    torch.randn(batch, length, 1)
    assert torch.equal(torch.rand(4), next_rand)
    out = {
        "mel": mel,
        "seed": seed,
        "f0": rec.out["f0"],
        "phases": phases,
        "noise": noise,
        "harmonics": rec.out["harmonics"],
        "s": s.clone(),
        "wav": wav.clone(),
        "next_rand": next_rand,
    }
    if cache_source is not None:
        out["cache_source"] = cache_source
    return out


def _synthetic_source(hift, seed: int = 21) -> dict:
    """The reference source module alone on a hand-made f0 contour (voiced, unvoiced, exactly 10 Hz, jumps)."""
    frames = 100
    t = torch.arange(frames, dtype=torch.float32)
    f0_a = 120.0 + 80.0 * torch.sin(t / 9.0)  # voiced glide 40..200 Hz
    f0_a[30:45] = 0.0  # unvoiced gap
    f0_a[60:63] = torch.tensor([10.0, 10.0001, 9.9999])  # threshold edge: voiced iff f0 > 10 (strict)
    f0_b = torch.where(t % 20 < 12, 310.0 - t, 3.0)  # high f0 with square on/off voicing
    f0 = torch.stack([f0_a, f0_b])  # (2, T)
    torch.manual_seed(seed)
    with _Recorder(hift) as rec, torch.inference_mode():
        up = hift.f0_upsamp(f0[:, None]).transpose(1, 2)  # (B, L, 1), as in HiFTGenerator.inference
        s, _, _ = hift.m_source(up)
    return {
        "f0": f0,
        "seed": seed,
        "phases": rec.samples[0].clone(),
        "noise": rec.randn[0],
        "harmonics": rec.out["harmonics"],
        "s": s.transpose(1, 2).clone(),
    }


def dump(ckpt: Path, out: Path) -> None:
    from safetensors.torch import load_file
    from chatterbox.models.s3gen import S3Gen

    s3gen = S3Gen().eval()
    state = load_file(str(ckpt / "s3gen.safetensors"))
    res = s3gen.load_state_dict(state, strict=False)
    bad = [k for k in res.missing_keys + res.unexpected_keys if k.startswith("mel2wav.")]
    assert not bad, bad
    hift = s3gen.mel2wav
    variants = {
        name: {k[len("mel2wav."):]: v for k, v in st.items() if k.startswith("mel2wav.")}
        for name, st in (("plain", state), ("voiced", perturb_mel2wav(state)), ("loud", perturb_mel2wav(state, True)))
    }
    del state

    for name, batch, frames, seed, weights in CASES:
        hift.load_state_dict(variants[weights], strict=True)
        save(out, f"case_{name}", _run_case(hift, batch, frames, seed))

    name, batch, frames, seed, weights = CACHE_CASE
    hift.load_state_dict(variants[weights], strict=True)
    cache = 0.3 * torch.sin(torch.arange(480 * 4, dtype=torch.float32) / 7.0).view(1, 1, -1)
    save(out, f"case_{name}", _run_case(hift, batch, frames, seed, cache_source=cache))
    save(out, "source_synthetic", _synthetic_source(hift))

    hift.load_state_dict(variants["plain"], strict=True)
    g = torch.Generator().manual_seed(5)
    example = 0.5 * torch.randn(2, 1500, generator=g)
    trimmed = example.clone()
    trimmed[:, : len(s3gen.trim_fade)] *= s3gen.trim_fade
    save(
        out,
        "misc",
        {
            "stft_window": hift.stft_window.clone(),
            "trim_fade": s3gen.trim_fade.clone(),
            "trim_example_in": example,
            "trim_example_out": trimmed,
        },
    )
