"""Demo of what the engine runs end to end today: text -> speech tokens with T3 (fp32, CPU or CUDA).

With the random-weight test checkpoint the tokens are meaningless (noise, not speech); with the real checkpoint
(`huggingface-cli download ResembleAI/chatterbox`) they are the model's speech tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from chatterbox_fast.config import T3Config
from chatterbox_fast.generation.decode import clean_speech_tokens, generate_tokens
from chatterbox_fast.generation.sampling import SamplingParams
from chatterbox_fast.models.t3 import T3, T3_KEYMAP
from chatterbox_fast.text import TextTokenizer
from chatterbox_fast.weights import load_strict, read_safetensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt-dir", type=Path, required=True)
    ap.add_argument("--text", default="Hello from chatterbox-fast, a fast Chatterbox engine.")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    with torch.device("meta"):
        t3 = T3(T3Config())
    load_strict(t3, read_safetensors(args.ckpt_dir / "t3_cfg.safetensors"), T3_KEYMAP, name="t3_cfg.safetensors")
    t3 = t3.to(args.device).eval()
    tok = TextTokenizer.from_file(args.ckpt_dir / "tokenizer.json")
    conds = torch.load(args.ckpt_dir / "conds.pt", map_location=args.device, weights_only=True)["t3"]
    print(f"loaded in {time.perf_counter() - t0:.1f} s")

    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    enc = tok.prepare(args.text)
    cond = t3.cond_embeds(conds["speaker_emb"], conds["cond_prompt_speech_tokens"].long(),
                          torch.tensor([0.5], device=args.device))
    x = t3.prefill_embeds(cond, enc.ids.to(args.device), cfg_batch=params.use_cfg)
    t0 = time.perf_counter()
    raw = generate_tokens(t3, x, params, generator=torch.Generator(args.device).manual_seed(args.seed))
    dt = time.perf_counter() - t0
    speech = clean_speech_tokens(raw)
    print(f"text: {enc.text!r} ({enc.ids.shape[1]} text ids)")
    print(f"{raw.shape[1]} tokens sampled in {dt:.2f} s ({1000 * dt / raw.shape[1]:.0f} ms/token), "
          f"{speech.numel()} valid speech tokens = {speech.numel() / 25:.2f} s of audio")
    print("first tokens:", speech[:20].tolist())
    if (args.ckpt_dir / "README.txt").exists():
        print("NOTE: this checkpoint has RANDOM WEIGHTS: the tokens are noise, not speech.")


if __name__ == "__main__":
    main()
