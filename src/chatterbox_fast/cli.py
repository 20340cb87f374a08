"""`chatterbox-fast` command line: speak text to a wav file."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _speak_parser(sub) -> None:
    p = sub.add_parser(
        "speak", help="synthesise text to a 24 kHz wav file",
        description="Synthesise TEXT to a 24 kHz mono wav. Downloads ResembleAI/chatterbox on first use unless "
                    "--ckpt-dir points at a local copy of its files.",
    )
    p.add_argument("text", help="the text to speak (use '-' to read it from standard input)")
    p.add_argument("-o", "--output", type=Path, default=Path("out.wav"),
                   help="output audio file; the extension picks the format: .wav (default out.wav), .flac, .ogg, .mp3")
    p.add_argument("--voice", type=Path, help="reference clip to clone (wav/flac/ogg, any rate), or a saved "
                                              "voice profile (.pt)")
    p.add_argument("--save-voice", type=Path, help="also save the voice profile prepared from --voice here")
    p.add_argument("--ckpt-dir", type=Path, help="local folder with the checkpoint files (no download)")
    p.add_argument("--device", help="cuda, cpu or mps (default: the best available)")
    p.add_argument("--seed", type=int, help="random seed for reproducible output")
    p.add_argument("--exaggeration", type=float, default=0.5, help="emotion exaggeration (default 0.5)")
    p.add_argument("--cfg-weight", type=float, default=0.5, help="classifier-free guidance weight; 0 disables "
                                                                  "it (default 0.5)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--repetition-penalty", type=float, default=1.2, help="(default 1.2)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p filter (default 0.05)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p filter (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=1000, help="cap on speech tokens, 25 per second "
                                                                    "(default 1000 = 40 s)")
    p.add_argument("--no-watermark", action="store_true", help="do not apply the Perth watermark")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--bf16", action="store_true", help="mixed precision: bf16 on CUDA; on CPU T3's weights in "
                   "bf16 with fp32 math (faster decode, small drift), and on CPUs with native bf16 (AMX) the flow "
                   "estimator in bf16 (--s3gen-quantize bf16)")
    p.add_argument("--quantize", choices=["int8", "bf16"], help="weight-only int8 (or bf16) for T3's linears "
                   "(faster decode; drift vs fp32 in BENCHMARKS.md)")
    p.add_argument("--s3gen-quantize", choices=["int8", "int8-attn", "bf16"], help="CPU: int8 GEMMs in S3Gen's "
                   "flow estimator (faster flow; changes the audio, drift in BENCHMARKS.md); int8-attn also int8 "
                   "attention (AVX512-VNNI CPUs); bf16: bf16 GEMMs and attention (fast on CPUs with AMX)")
    p.add_argument("--kv-cache", choices=["fp32", "bf16", "int8"], help="T3's KV cache storage (default fp32, bf16 "
                   "with --quantize / --bf16 on CPU); int8 (CPU): a quarter of the cache bytes per token, changes the "
                   "audio (drift in BENCHMARKS.md)")
    p.add_argument("--speculative", choices=["auto", "int8", "off"], default="auto", help="CPU, fp32 T3: an int8 "
                   "draft of T3 proposes tokens and the fp32 model checks several per pass over its weights; the "
                   "same audio, bit for bit, faster (+0.5 GB). auto (default): int8 where it applies; off: never")
    p.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: run the decode step and the flow estimator "
                   "eagerly instead of replaying CUDA graphs")
    p.add_argument("--cfm-steps", type=int, help="S3Gen flow-matching steps (default 10 = the reference's, exact); "
                   "fewer is faster and changes the audio (opt-in, see BENCHMARKS.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="progress and timings")


def _output_subtype(path: Path) -> str:
    """The soundfile subtype to write `path` with: 16-bit PCM where its format (from the extension) takes it, else
    the format's default (mp3, ogg/vorbis). ValueError for an extension soundfile cannot write, before any work."""
    import soundfile as sf

    fmt = path.suffix[1:].upper()
    if fmt not in sf.available_formats():
        raise ValueError(f"cannot write {path}: unknown audio format {path.suffix or '(no extension)'!r}; use .wav, "
                         ".flac, .ogg or .mp3")
    return "PCM_16" if sf.check_format(fmt, "PCM_16") else sf.default_subtype(fmt)


def _speak(args) -> int:
    import soundfile as sf

    from .engine import OptimizedChatterboxTTS

    subtype = _output_subtype(args.output)
    text = sys.stdin.read() if args.text == "-" else args.text
    kw = dict(device=args.device, enable_compilation=args.compile, use_mixed_precision=args.bf16,
              enable_watermark=not args.no_watermark, quantize=args.quantize, cuda_graphs=not args.no_cuda_graphs,
              s3gen_quantize=args.s3gen_quantize, kv_cache=args.kv_cache,
              speculative=None if args.speculative == "off" else args.speculative)
    t0 = time.perf_counter()
    if args.ckpt_dir is not None:
        model = OptimizedChatterboxTTS.from_local(args.ckpt_dir, **kw)
    else:
        model = OptimizedChatterboxTTS.from_pretrained(**kw)
    random_weights = args.ckpt_dir is not None and (args.ckpt_dir / "README.txt").is_file() and \
        "RANDOM WEIGHTS" in (args.ckpt_dir / "README.txt").read_text()
    if random_weights:
        print("NOTE: this checkpoint has RANDOM WEIGHTS (test checkpoint): the output is noise, not speech.",
              file=sys.stderr)
    t_load = time.perf_counter() - t0
    if args.voice is not None:
        if args.voice.suffix == ".pt":
            model.set_voice(args.voice)
        else:
            model.prepare_conditionals(str(args.voice), exaggeration=args.exaggeration)
        if args.save_voice is not None:
            model.save_voice(args.save_voice)
    t0 = time.perf_counter()
    wav = model.generate(text, exaggeration=args.exaggeration, cfg_weight=args.cfg_weight,
                         temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                         min_p=args.min_p, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                         verbose=args.verbose, cfm_steps=args.cfm_steps)
    t_gen = time.perf_counter() - t0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.output, wav.squeeze(0).numpy(), model.sr, subtype=subtype)
    dur = wav.shape[1] / model.sr
    print(f"wrote {args.output}: {dur:.2f} s of audio at {model.sr} Hz "
          f"(load {t_load:.1f} s, synthesis {t_gen:.1f} s, RTF {t_gen / max(dur, 1e-9):.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chatterbox-fast", description="Fast Chatterbox text-to-speech.")
    sub = ap.add_subparsers(dest="command", required=True)
    _speak_parser(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _speak(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"chatterbox-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
