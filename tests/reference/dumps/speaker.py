"""Reference tensors of the voice-cloning path inside S3Gen: CAMPPlus x-vector and the S3 tokenizer v2.

Runs in the ORACLE venv. Builds only the reference `S3Gen()` (not the whole ChatterboxTTS), loads the oracle's
s3gen.safetensors strictly, and follows the reference's own audio path (`ChatterboxTTS.prepare_conditionals` +
`S3Token2Mel.embed_ref`):
  wav24 = librosa.load(clip, sr=24000)                              # as prepare_conditionals
  embed_ref path:  wav16 = torchaudio Resample(24k->16k)(wav24[:10 s])  -> fbank, x-vector, log-mel, tokens
  T3 prompt path:  p16 = librosa.resample(wav24, 24k->16k)[:6 s]    -> log-mel, tokens with max_len=150

Files (one .pt per clip, plus extras):
  <clip>.pt: wav16, fbank (raw Kaldi fbank, before the mean subtraction), xvector (1,192), log_mel (128,T), tokens
             (1,T4), token_lens (1,), prompt_wav16, prompt_log_mel (128, <=600), prompt_tokens (1,<=150),
             prompt_token_lens, max150_tokens / max150_token_lens (wav16 through the reference with max_len=150),
             and for EMBED_REF_CLIPS embed_ref_tokens / embed_ref_embedding (embed_ref's own outputs, after its
             mel-length truncation of the tokens)
  batch.pt: the reference tokenizer on a list of clips of different lengths (its own zero padding + masks)
  intermediates.pt: per-stage outputs for one clip (tokenizer encoder stages, FSQ projection; CAMPPlus stages)
  perturbed.pt: BN statistics/affines (CAMPPlus) and LayerNorm affines (tokenizer) replaced by seeded random values
             (the random-weight checkpoint has identity BN/LN, which would not exercise that math), with the
             reference outputs under those values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402

CLIPS = ("voice_9p5s_24k", "voice_6s_24k", "voice_10s_24k", "voice_12s_44k_stereo", "voice_0p5s_16k")
INTERMEDIATE_CLIP = "voice_6s_24k"
PERTURB_CLIP = "voice_9p5s_24k"
EMBED_REF_CLIPS = ("voice_9p5s_24k", "voice_0p5s_16k")  # odd prompt-mel length (token truncation) and very short
BATCH_CLIPS = ("voice_9p5s_24k", "voice_0p5s_16k", "voice_6s_24k")  # different lengths, longest first not required
S3_SR, S3GEN_SR = 16000, 24000
ENC_COND_LEN, DEC_COND_LEN, PROMPT_LEN = 6 * S3_SR, 10 * S3GEN_SR, 150


def _load_s3gen(ckpt: Path):
    from safetensors.torch import load_file
    from chatterbox.models.s3gen import S3Gen

    s3gen = S3Gen().eval()
    state = load_file(str(ckpt / "s3gen.safetensors"))
    s3gen.load_state_dict(state, strict=True)  # strict: the file was written from this module's state_dict
    return s3gen


def _clip_tensors(s3gen, path: Path) -> dict:
    import librosa
    import torchaudio.compliance.kaldi as kaldi
    from chatterbox.models.s3gen.s3gen import get_resampler

    tok, camp = s3gen.tokenizer, s3gen.speaker_encoder
    wav24, _ = librosa.load(str(path), sr=S3GEN_SR)  # mono, soxr_hq, as prepare_conditionals
    prompt16 = librosa.resample(wav24, orig_sr=S3GEN_SR, target_sr=S3_SR)[:ENC_COND_LEN]
    ref24 = torch.from_numpy(wav24[:DEC_COND_LEN]).float()[None]  # (1, L24)
    wav16 = get_resampler(S3GEN_SR, S3_SR, "cpu")(ref24)  # (1, L16), embed_ref's resampler

    fbank = kaldi.fbank(wav16[0][None], num_mel_bins=80)  # (T, 80), what extract_feature computes before CMN
    xvector = camp.inference(wav16)  # (1, 192)
    log_mel = tok.log_mel_spectrogram(wav16.float())[0]  # (128, T)
    tokens, token_lens = tok(wav16.float())
    prompt_log_mel = tok.log_mel_spectrogram(torch.from_numpy(prompt16))[..., : 4 * PROMPT_LEN]
    prompt_tokens, prompt_token_lens = tok.forward([prompt16], max_len=PROMPT_LEN)
    max150_tokens, max150_lens = tok.forward(wav16, max_len=PROMPT_LEN)  # truncation of the longer embed_ref wav

    out = {
        "wav16": wav16[0].contiguous(),
        "fbank": fbank,
        "xvector": xvector,
        "log_mel": log_mel.contiguous(),
        "tokens": tokens,
        "token_lens": token_lens,
        "prompt_wav16": torch.from_numpy(prompt16).contiguous(),
        "prompt_log_mel": prompt_log_mel.contiguous(),
        "prompt_tokens": prompt_tokens,
        "prompt_token_lens": prompt_token_lens,
        "max150_tokens": max150_tokens,
        "max150_token_lens": max150_lens,
    }
    if path.stem in EMBED_REF_CLIPS:  # check the replicated path against embed_ref itself
        ref = s3gen.embed_ref(wav24[:DEC_COND_LEN], S3GEN_SR, device="cpu")
        assert torch.equal(ref["embedding"], xvector), "embed_ref x-vector differs from the replicated path"
        n = ref["prompt_token"].shape[1]
        assert torch.equal(ref["prompt_token"], tokens[:, :n]), "embed_ref tokens differ from the replicated path"
        out.update(embed_ref_tokens=ref["prompt_token"], embed_ref_embedding=ref["embedding"])
    return out


def _tokenizer_stages(tok, log_mel: torch.Tensor) -> dict:
    """Outputs of conv1, conv2, each block, FSQ projection (before tanh) and the value that is rounded."""
    enc, cb = tok.encoder, tok.quantizer._codebook
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        enc.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv1", o.detach().clone())),
        enc.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("conv2", o.detach().clone())),
        cb.project_down.register_forward_hook(lambda m, i, o: seen.__setitem__("project_down", o.detach().clone())),
    ]
    for j, blk in enumerate(enc.blocks):
        hooks.append(blk.register_forward_hook(lambda m, i, o, j=j: seen.__setitem__(f"block{j}", o.detach().clone())))
    mel = log_mel[None]
    lens = torch.tensor([mel.shape[-1]], dtype=torch.int32)
    tokens, _ = tok.quantize(mel, lens)
    for h in hooks:
        h.remove()
    pre_round = seen["project_down"].float().tanh() * 0.9990000128746033  # exactly FSQCodebook.encode
    return {**{f"tok_{k}": v for k, v in seen.items()}, "tok_pre_round": pre_round, "tok_tokens": tokens.long()}


def _campplus_stages(camp, fbank: torch.Tensor) -> dict:
    seen: dict[str, torch.Tensor] = {}
    hooks = [camp.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", o.detach().clone()))]
    for name, mod in camp.xvector.named_children():
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.detach().clone())))
    feats = (fbank - fbank.mean(dim=0, keepdim=True))[None]
    out = camp(feats)
    for h in hooks:
        h.remove()
    return {**{f"camp_{k}": v for k, v in seen.items()}, "camp_out": out.detach()}


def _perturb(module: torch.nn.Module, kinds: tuple[type, ...], gen: torch.Generator) -> dict:
    """Replace BN running stats / affines and LN affines by seeded random values; return the new tensors."""
    new: dict[str, torch.Tensor] = {}
    for name, mod in module.named_modules():
        if not isinstance(mod, kinds):
            continue
        c = mod.num_features if hasattr(mod, "num_features") else mod.normalized_shape[0]
        if getattr(mod, "running_mean", None) is not None:
            mod.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            mod.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            new[f"{name}.running_mean"] = mod.running_mean.clone()
            new[f"{name}.running_var"] = mod.running_var.clone()
        if getattr(mod, "weight", None) is not None:
            mod.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=gen))
            mod.bias.copy_(0.2 * torch.randn(c, generator=gen))
            new[f"{name}.weight"] = mod.weight.detach().clone()
            new[f"{name}.bias"] = mod.bias.detach().clone()
    return new


@torch.no_grad()
def dump(ckpt: Path, out: Path) -> None:
    torch.manual_seed(0)
    s3gen = _load_s3gen(ckpt)
    tok, camp = s3gen.tokenizer, s3gen.speaker_encoder

    per_clip = {}
    for name in CLIPS:
        per_clip[name] = _clip_tensors(s3gen, ckpt / "clips" / f"{name}.wav")
        save(out, name, per_clip[name])

    # The reference tokenizer's own batching: a list of waveforms, zero-padded log-mels + length masks.
    wavs = [per_clip[n]["wav16"] for n in BATCH_CLIPS]
    b_tokens, b_lens = tok(wavs)
    save(out, "batch", {"clips": list(BATCH_CLIPS), "tokens": b_tokens, "token_lens": b_lens})

    clip = per_clip[INTERMEDIATE_CLIP]
    stages = {"clip": INTERMEDIATE_CLIP}
    stages.update(_tokenizer_stages(tok, clip["log_mel"]))
    stages.update(_campplus_stages(camp, clip["fbank"]))
    save(out, "intermediates", stages)

    # Non-trivial BN / LN values (the random-weight file has BN mean 0 var 1 w 1 b 0, LN w 1 b 0).
    gen = torch.Generator().manual_seed(4321)
    clip = per_clip[PERTURB_CLIP]
    bn = _perturb(camp, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d), gen)
    ln = _perturb(tok, (torch.nn.LayerNorm,), gen)
    xvec = camp.inference(clip["wav16"][None])
    tstages = _tokenizer_stages(tok, clip["log_mel"])
    save(out, "perturbed", {
        "clip": PERTURB_CLIP,
        "speaker_encoder": bn,  # keys relative to speaker_encoder.
        "tokenizer": ln,  # keys relative to tokenizer.
        "xvector": xvec,
        "tokens": tstages["tok_tokens"],
        "pre_round": tstages["tok_pre_round"],
    })
