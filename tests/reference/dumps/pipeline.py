"""Reference end to end (oracle venv): conditionals from audio files, and a whole `generate` with its randomness.

For `generate`, the reference's T3 sampled ids are recorded, the global RNG state is saved right before
`S3Gen.inference` (so our S3Gen can replay the same CFM noise and HiFT phases/noise), and the waveform is
captured before the Perth watermark (and after it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dumps._common import load_reference, save

CLIPS = ("voice_6s_24k", "voice_12s_44k_stereo", "voice_9p5s_24k")
TEXT = "Hello there... this is chatterbox-fast - speaking: one, two, three!"
MAX_NEW_TOKENS = 40


def dump(ckpt: Path, out: Path) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    tts = load_reference(ckpt)

    for clip in CLIPS:
        tts.prepare_conditionals(str(ckpt / "clips" / f"{clip}.wav"), exaggeration=0.5)
        t3, gen = tts.conds.t3, tts.conds.gen
        save(out, f"conds_{clip}", {
            "speaker_emb": t3.speaker_emb.clone(), "prompt_tokens": t3.cond_prompt_speech_tokens.clone(),
            "prompt_token": gen["prompt_token"].clone(), "prompt_feat": gen["prompt_feat"].clone(),
            "embedding": gen["embedding"].clone(),
        })

    # generate() with the built-in voice, capped, recording its randomness
    from chatterbox.tts import Conditionals

    rec = {}
    inference = tts.t3.inference
    s3_inference = tts.s3gen.inference
    apply_wm = tts.watermarker.apply_watermark

    def t3_inference(*a, **k):
        k["max_new_tokens"] = MAX_NEW_TOKENS
        out_ = inference(*a, **k)
        rec["raw_tokens"] = out_.clone()
        return out_

    def s3(speech_tokens, ref_dict, *a, **k):
        rec["speech_tokens"] = speech_tokens.clone()
        rec["rng_state"] = torch.get_rng_state()
        return s3_inference(speech_tokens=speech_tokens, ref_dict=ref_dict, *a, **k)

    def wm(wav, sample_rate):
        rec["wav_before_watermark"] = torch.from_numpy(wav.copy())
        return apply_wm(wav, sample_rate=sample_rate)

    tts.t3.inference = t3_inference
    tts.s3gen.inference = lambda speech_tokens, ref_dict, *a, **k: s3(speech_tokens, ref_dict, *a, **k)
    tts.watermarker.apply_watermark = wm
    for seed in range(20):
        tts.conds = Conditionals.load(ckpt / "conds.pt")
        torch.manual_seed(seed)
        try:
            wav = tts.generate(TEXT)
        except Exception:  # random weights: a doubly sampled SOS makes the reference's clean-up raise
            continue
        if rec["speech_tokens"].numel() >= 10:
            break
    save(out, "generate", {
        "text": TEXT, "seed": seed, "max_new_tokens": MAX_NEW_TOKENS, "raw_tokens": rec["raw_tokens"],
        "speech_tokens": rec["speech_tokens"], "rng_state": rec["rng_state"],
        "wav_before_watermark": rec["wav_before_watermark"], "wav": wav.clone(),
    })
