"""Build the reference checkpoint with random weights, in the official file layout. Run with the ORACLE python.

Files: ve.safetensors, t3_cfg.safetensors, s3gen.safetensors (state_dicts of the reference's own modules built under
fixed seeds), tokenizer.json (synthetic, real format), conds.pt (the reference's own prepare_conditionals on a
synthetic clip), clips/*.wav (synthetic reference audio). RANDOM WEIGHTS: the model makes noise, not speech.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 1234


def synthetic_tokenizer_json() -> str:
    """A tokenizers BPE file in the real format: [STOP]=0 [UNK]=1 [SPACE]=2 [START]=255, 704 ids, some merges."""
    from tokenizers import Tokenizer, AddedToken
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    vocab: dict[str, int] = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2}
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII without space
    chars += list("àáâäçèéêëíîïñóôöúûüßÀÉÑÖÜ¡¿€£°")
    for ch in chars:
        vocab[ch] = len(vocab)
    assert len(vocab) < 255
    while len(vocab) < 255:
        vocab[f"[PLACEHOLDER{len(vocab)}]"] = len(vocab)
    vocab["[START]"] = 255
    chunks = [
        "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is", "it",
        "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "ve", "co", "me", "de", "hi", "ri",
        "ro", "ic", "ne", "ea", "ra", "ce", "li", "ch", "ll", "be", "ma", "si", "om", "ur", "the", "and", "ing",
        "ion", "tio", "ent", "ati", "for", "her", "ter", "hat", "tha", "ere", "ate", "his", "con", "res", "ver",
        "all", "ons", "nce", "men", "ith", "ted", "ers", "pro", "thi", "wit", "are", "ess", "not", "ive", "was",
        "ect", "rea", "com", "eve", "per", "int", "est", "sta", "cti", "ica", "ist", "ear", "ain", "one", "our",
        "iti", "rat", "ell", "ant", "The", "Th", "wh", "Wh", "you", "yo", "ow", "ay", "ly", "ee", "oo", "ck",
    ]
    merges: list[tuple[str, str]] = []
    for chunk in chunks:
        # merge left-to-right: prefix + next char, adding each intermediate piece
        cur = chunk[0]
        for ch in chunk[1:]:
            nxt = cur + ch
            if nxt not in vocab:
                merges.append((cur, ch))
                vocab[nxt] = len(vocab)
            cur = nxt
    while len(vocab) < 704:
        vocab[f"[PLACEHOLDER{len(vocab)}]"] = len(vocab)
    assert len(vocab) == 704, len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="[UNK]", fuse_unk=False))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("[STOP]", "[UNK]", "[SPACE]", "[START]")])
    return tok.to_str(pretty=True)


def build(out: Path) -> None:
    from safetensors.torch import save_file
    from chatterbox.models.t3 import T3
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.tts import ChatterboxTTS
    import synth

    out.mkdir(parents=True, exist_ok=True)
    for name, ctor, seed in (("ve", VoiceEncoder, SEED), ("t3_cfg", T3, SEED + 1), ("s3gen", S3Gen, SEED + 2)):
        torch.manual_seed(seed)
        module = ctor().eval()
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
        del module, state
    (out / "tokenizer.json").write_text(synthetic_tokenizer_json())
    synth.write_clips(out / "clips")
    (out / "README.txt").write_text(
        "RANDOM WEIGHTS built from the reference modules (chatterbox-tts 0.1.7) under fixed seeds.\n"
        "This checkpoint produces noise, not speech. For tests and benchmarks only.\n"
    )
    # Built-in voice through the reference's real path.
    torch.manual_seed(SEED + 3)
    tts = ChatterboxTTS.from_local(out, device="cpu")
    tts.prepare_conditionals(str(out / "clips" / "voice_9p5s_24k.wav"), exaggeration=0.5)
    tts.conds.save(out / "conds.pt")
    json.dump({"seed": SEED, "random_weights": True}, open(out / "build_info.json", "w"))
