"""Reference tensors for the S3Gen flow (tokens + prompt -> mel). Runs in the ORACLE venv.

Builds the reference `S3Gen()` only (not the whole TTS) and loads s3gen.safetensors into it strictly. Prompts:
  conds  - conds.pt `gen` (9.5 s clip: P = 475 odd, Np = 237)
  p6s    - embed_ref(voice_6s_24k)            (P = 300 even, Np = 150)
  p10s   - embed_ref(voice_10s_24k)           (P = 500 even, Np = 250)
  p05    - embed_ref(first 0.5 s of voice_6s)  (P = 25 odd, Np = 12)
  p052   - embed_ref(first 0.52 s of voice_6s) (P = 26 even, Np = 13)
Generated tokens: seeded random ids in [0, 6561). Each case goes through `S3Gen.flow_inference(..., finalize=True)`,
the path `S3Gen.inference` takes, with hooks that record the encoder output, mu (encoder_proj output), the CFM noise
(torch.randn_like is wrapped), the estimator's step-0 inputs and each step's raw estimator output (cond rows first,
then uncond rows). On 2 CPU cores the estimator costs seconds per call at T ~ 1000, so:
  full   - all 10 steps and the final mel (short prompts, T <= 74), one case with every step's velocity;
  step0  - stop after the first estimator call (long prompts): encoder, mu, noise, step-0 inputs and velocity;
  enc    - stop before the first estimator call (1000 tokens): encoder, mu, noise;
  length - estimator replaced by a zero stub: the output mel shape from the reference's own flow code;
  wav    - one whole `S3Gen.inference` (flow + HiFT + trim_fade) after torch.manual_seed, for the S3Gen wrapper.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ._common import save

N_VOCAB = 6561


class _Stop(Exception):
    pass


def _tokens(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, N_VOCAB, (batch, n), generator=g)


def _load_s3gen(ckpt: Path):
    from chatterbox.models.s3gen import S3Gen
    from safetensors.torch import load_file

    model = S3Gen().eval()
    model.load_state_dict(load_file(str(ckpt / "s3gen.safetensors")), strict=True)
    return model


def _prompts(model, ckpt: Path) -> dict[str, dict]:
    import soundfile as sf

    gen = torch.load(ckpt / "conds.pt", weights_only=True)["gen"]
    out = {"conds": {k: v for k, v in gen.items() if v is not None}}
    wav6, sr6 = sf.read(ckpt / "clips" / "voice_6s_24k.wav", dtype="float32")
    wav10, sr10 = sf.read(ckpt / "clips" / "voice_10s_24k.wav", dtype="float32")
    assert sr6 == sr10 == 24000
    clips = {"p6s": wav6, "p10s": wav10, "p05": wav6[:12000], "p052": wav6[:12480]}
    with torch.inference_mode():
        for name, wav in clips.items():
            d = model.embed_ref(torch.from_numpy(wav.copy())[None], 24000)
            out[name] = {k: v for k, v in d.items() if v is not None}
    return {name: {k: v.clone() for k, v in d.items()} for name, d in out.items()}


def _run(model, prompt: dict, tokens: torch.Tensor, *, mode: str, noise_seed: int, lens=None) -> dict:
    """One reference flow call with recording hooks; mode in {full, step0, enc, length}."""
    rec: dict = {"v": []}
    est = model.flow.decoder.estimator
    orig_est = est.forward
    orig_randn_like = torch.randn_like

    def randn_like(*a, **k):
        z = orig_randn_like(*a, **k)
        rec["noise"] = z.clone()
        return z

    def est_forward(x, mask, mu, t, spks=None, cond=None, r=None):
        if mode == "length":
            return torch.zeros_like(x)
        if mode == "enc":
            raise _Stop
        if not rec["v"]:
            rec.update(x_in=x.clone(), mask_in=mask.clone(), mu_in=mu.clone(), t_in=t.clone(),
                       spks_in=spks.clone(), cond_in=cond.clone())
        v = orig_est(x, mask, mu, t, spks, cond, r)
        rec["v"].append(v.clone())
        if mode == "step0":
            raise _Stop
        return v

    hooks = [
        model.flow.encoder.register_forward_hook(lambda m, i, o: rec.__setitem__("h", o[0].clone())),
        model.flow.encoder_proj.register_forward_hook(lambda m, i, o: rec.__setitem__("mu", o.clone())),
    ]
    est.forward = est_forward
    torch.randn_like = randn_like
    try:
        torch.manual_seed(noise_seed)
        ref_dict = dict(prompt, prompt_feat_len=None)  # the reference's flow wants the key even when None
        mel = model.flow_inference(
            tokens, ref_dict=ref_dict, n_cfm_timesteps=10, finalize=True, speech_token_lens=lens
        )
        rec["mel_shape"] = list(mel.shape)
        if mode == "full":
            rec["mel"] = mel.clone()
    except _Stop:
        pass
    finally:
        torch.randn_like = orig_randn_like
        del est.forward
        for h in hooks:
            h.remove()
    if mode == "length":
        return {"mel_shape": rec["mel_shape"]}
    out = {k: v for k, v in rec.items() if k != "v"}
    if rec["v"]:
        out["v"] = torch.stack(rec["v"])  # (steps, 2B, 80, T)
    return out


def _wav_case(model, prompt: dict) -> dict:
    """The whole S3Gen.inference (flow + HiFT + trim_fade) from a seeded global RNG, nothing recorded inside."""
    tokens = _tokens(25, 21)
    seed = 2021
    torch.manual_seed(seed)
    with torch.inference_mode():
        wav, _ = model.inference(tokens, ref_dict=dict(prompt, prompt_feat_len=None))
    return {"tokens": tokens, "seed": seed, "wav": wav.clone(), "prompt": "p05"}


# name: (prompt, n_tokens, token seed, mode, batch lengths or None)
CASES = {
    "p05_n1": ("p05", 1, 11, "full", None),
    "p05_n2": ("p05", 2, 12, "full", None),
    "p05_n25": ("p05", 25, 13, "full", None),  # every step's velocity is kept
    "p052_n25": ("p052", 25, 15, "full", None),
    "p052_b2": ("p052", 5, 16, "full", [5, 3]),  # right-padded batch of 2
    "conds_n25": ("conds", 25, 17, "step0", None),
    "p6s_n25": ("p6s", 25, 18, "step0", None),
    "p10s_n250": ("p10s", 250, 19, "step0", None),
    "p05_n1000": ("p05", 1000, 20, "enc", None),
}
LENGTH_PROMPTS = ("p05", "p052", "p6s", "conds", "p10s")
LENGTH_TOKENS = (1, 2, 25, 250)
LENGTH_1000 = ("p05", "conds")


def dump(ckpt: Path, out: Path) -> None:
    # One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other and every small op of the
    # estimator gets ~10x slower (measured: 0.7 s vs 5-9 s per estimator call at T = 26 under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _dump(ckpt, out)
    finally:
        torch.set_num_threads(threads)


def _dump(ckpt: Path, out: Path) -> None:
    t0 = time.perf_counter()
    model = _load_s3gen(ckpt)
    prompts = _prompts(model, ckpt)
    save(out, "prompts", prompts)
    for name, (pname, n, seed, mode, lens) in CASES.items():
        batch = 1 if lens is None else len(lens)
        tokens = _tokens(n, seed, batch)
        lens_t = None if lens is None else torch.tensor(lens)
        t1 = time.perf_counter()
        res = _run(model, prompts[pname], tokens, mode=mode, noise_seed=1000 + seed, lens=lens_t)
        res.update(prompt=pname, tokens=tokens, mode=mode)
        if lens is not None:
            res["lens"] = lens_t
        save(out, name, res)
        print(f"[s3gen_flow] {name}: {mode} {time.perf_counter() - t1:.1f} s")
    lengths = []
    for pname in LENGTH_PROMPTS:
        for n in LENGTH_TOKENS + ((1000,) if pname in LENGTH_1000 else ()):
            tokens = _tokens(n, 100 + n)
            res = _run(model, prompts[pname], tokens, mode="length", noise_seed=0)
            lengths.append({"prompt": pname, "n": n, "mel_shape": res["mel_shape"]})
    save(out, "lengths", {"cases": lengths})
    save(out, "wav_p05_n25", _wav_case(model, prompts["p05"]))
    print(f"[s3gen_flow] total {time.perf_counter() - t0:.1f} s")
