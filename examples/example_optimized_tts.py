"""Quick run and timing of OptimizedChatterboxTTS (the optimisation guide's example_optimized_tts.py).

    python examples/example_optimized_tts.py                       # downloads ResembleAI/chatterbox
    python examples/example_optimized_tts.py --ckpt-dir DIR        # a local copy of the checkpoint files

With the random-weight test checkpoint (`make demo`) the audio is noise, not speech.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import soundfile as sf
import torch

from chatterbox_fast import OptimizedChatterboxTTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path)
    ap.add_argument("--device", default=None)
    ap.add_argument("--voice", help="reference clip to clone")
    ap.add_argument("--out", type=Path, default=Path("out/example.wav"))
    ap.add_argument("--max-new-tokens", type=int, default=1000)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (warm-up at load)")
    ap.add_argument("--bf16", action="store_true", help="mixed precision (CUDA)")
    ap.add_argument("--quantize", choices=["int8"], help="weight-only int8 for T3's linears")
    ap.add_argument("--no-watermark", action="store_true")
    args = ap.parse_args()

    opts = dict(device=args.device, enable_compilation=args.compile, use_mixed_precision=args.bf16,
                enable_watermark=not args.no_watermark, quantize=args.quantize)
    t0 = time.perf_counter()
    if args.ckpt_dir:
        model = OptimizedChatterboxTTS.from_local(args.ckpt_dir, **opts)
    else:
        model = OptimizedChatterboxTTS.from_pretrained(**opts)
    print(f"loaded on {model.device} in {time.perf_counter() - t0:.1f} s")

    text = "Ezreal and Jinx teamed up with Ahri, Yasuo, and Teemo to take down the enemy's Nexus."
    t0 = time.perf_counter()
    wav = model.generate(text, audio_prompt_path=args.voice, max_new_tokens=args.max_new_tokens, seed=0)
    dt = time.perf_counter() - t0
    dur = wav.shape[1] / model.sr
    print(f"{dur:.2f} s of audio in {dt:.2f} s: RTF {dt / max(dur, 1e-9):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.out, wav.squeeze(0).numpy(), model.sr)
    print(f"wrote {args.out}")
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
