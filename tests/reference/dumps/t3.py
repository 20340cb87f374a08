"""Reference T3 tensors: conditioning, prefill embeddings/logits, and teacher-forced decoding (oracle venv).

The reference's own sampling loop runs unchanged; `torch.multinomial` and the backend's forward are wrapped to record
(a) the raw speech logits of every forward and (b) the processed distribution handed to multinomial, step by step.
The sampled ids are the reference's own sequence, later fed back to our engine (teacher forcing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dumps._common import save

TEXTS = {
    "quirks": "hello there... this is a test - of the emergency: broadcast system; “quoted” — ok",
    "plain": "The quick brown fox jumps over the lazy dog.",
}
SETTINGS = {
    "defaults": dict(temperature=0.8, cfg_weight=0.5, repetition_penalty=1.2, min_p=0.05, top_p=1.0),
    "sharp": dict(temperature=0.5, cfg_weight=0.3, repetition_penalty=1.2, min_p=0.1, top_p=0.8),
    "rep2": dict(temperature=0.8, cfg_weight=0.5, repetition_penalty=2.0, min_p=0.05, top_p=1.0),
}
STEPS = 110


def _load(ckpt: Path):
    from safetensors.torch import load_file
    from chatterbox.models.t3 import T3
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.tts import Conditionals

    t3 = T3()
    t3.load_state_dict(load_file(ckpt / "t3_cfg.safetensors"))
    t3.eval()
    conds = Conditionals.load(ckpt / "conds.pt")
    return t3, EnTokenizer(str(ckpt / "tokenizer.json")), conds


def _fresh_cond(conds, exaggeration):
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    c = conds.t3
    return T3Cond(speaker_emb=c.speaker_emb, cond_prompt_speech_tokens=c.cond_prompt_speech_tokens,
                  emotion_adv=exaggeration * torch.ones(1, 1, 1))


def _text_ids(tok, text, cfg):
    import torch.nn.functional as F
    from chatterbox.tts import punc_norm

    ids = tok.text_to_tokens(punc_norm(text))
    if cfg > 0:
        ids = torch.cat([ids, ids], dim=0)
    ids = F.pad(ids, (1, 0), value=255)
    return F.pad(ids, (0, 1), value=0)


def _run(t3, text_ids, cond, setting, steps, seed):
    from chatterbox.models.t3.inference import t3_hf_backend

    rec = {"raw": [], "probs": [], "tokens": [], "inputs_embeds": None}
    backend_forward = t3_hf_backend.T3HuggingfaceBackend.forward
    multinomial = torch.multinomial

    def forward(self, inputs_embeds, *a, **k):
        if rec["inputs_embeds"] is None:
            rec["inputs_embeds"] = inputs_embeds.detach().clone()
        out = backend_forward(self, inputs_embeds, *a, **k)
        rec["raw"].append(out.logits[:, -1].detach().clone())
        return out

    def draw(probs, num_samples, *a, **k):
        t = multinomial(probs, num_samples, *a, **k)
        rec["probs"].append(probs.detach().clone())
        rec["tokens"].append(int(t))
        return t

    t3_hf_backend.T3HuggingfaceBackend.forward = forward
    torch.multinomial = draw
    try:
        torch.manual_seed(seed)
        t3.inference(t3_cond=cond, text_tokens=text_ids, max_new_tokens=steps, **setting)
    finally:
        t3_hf_backend.T3HuggingfaceBackend.forward = backend_forward
        torch.multinomial = multinomial
    return rec


def dump(ckpt: Path, out: Path) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    t3, tok, conds = _load(ckpt)

    # conditioning (two exaggerations) and the text ids the reference builds
    for exg in (0.5, 0.7):
        cond = _fresh_cond(conds, exg)
        save(out, f"cond_{exg}", {
            "speaker_emb": cond.speaker_emb, "prompt_tokens": cond.cond_prompt_speech_tokens,
            "exaggeration": float(exg), "cond_embeds": t3.prepare_conditioning(cond).detach().clone(),
        })

    # teacher-forced runs: the reference's own sampled sequence and processed distribution per step
    for name, setting in SETTINGS.items():
        text = TEXTS["quirks"]
        for seed in range(10):
            ids = _text_ids(tok, text, setting["cfg_weight"])
            rec = _run(t3, ids, _fresh_cond(conds, 0.5), setting, STEPS, seed)
            if 6562 not in rec["tokens"][:100]:
                break
        save(out, f"decode_{name}", {
            "text": text, "text_ids": ids[:1].clone(), "setting": setting, "exaggeration": 0.5, "seed": seed,
            "inputs_embeds": rec["inputs_embeds"], "raw_logits": torch.stack(rec["raw"]),
            "probs": torch.cat(rec["probs"]), "tokens": torch.tensor(rec["tokens"]),
        })

    # prefill only: another text and exaggeration
    ids = _text_ids(tok, TEXTS["plain"], 0.5)
    rec = _run(t3, ids, _fresh_cond(conds, 0.7), SETTINGS["defaults"], 1, 0)
    save(out, "prefill_plain_0.7", {
        "text": TEXTS["plain"], "text_ids": ids[:1].clone(), "exaggeration": 0.7,
        "inputs_embeds": rec["inputs_embeds"], "raw_logits": rec["raw"][0],
    })
