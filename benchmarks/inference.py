"""Our engine alone, across modes: load, first request (compilation), T3 prefill and decode, S3Gen flow and HiFT,
end to end and RTF, achieved bandwidth against the machine's, peak memory. The counterpart of the optimisation
guide's `benchmark_inference.py`.

    .venv/bin/python benchmarks/inference.py --device cpu --modes eager-fp32,compiled-fp32 [--quick]
    python benchmarks/inference.py --device cuda --modes eager-fp32,compiled-fp32,eager-bf16,compiled-bf16 \
        --budget-s 600 --out $OUT/inference-cuda.json

RANDOM WEIGHTS (noise, not speech): the default checkpoint is the oracle's random-weight one (official shapes).
Speed does not depend on the values, except for when T3 stops: random weights draw the stop token (and the other
special ids) at random. Every request is therefore forced to a fixed length, inside `fixed_length()`:
- the generation loop's stop id (`generation.decode.STOP_SPEECH`) is pointed at -1, an id that cannot be drawn, so
  T3 decodes exactly --tokens tokens through the engine's own loop (its periodic EOS check still runs; nothing is
  added per step);
- the engine's token clean-up keeps all of them, folded into the speech vocabulary (id % 6561), so S3Gen always
  gets --tokens tokens (--tokens x 40 ms of audio; 250 = 10 s) instead of a random cut at a drawn SOS/EOS.
A run that still ends early (the engine changed) is flagged ("stopped_early") and measured as generated.

Modes: {eager,compiled}-{fp32,bf16,int8} = from_local(enable_compilation=..., use_mixed_precision=(bf16),
quantize="int8" (int8)); CPU: compiled-int8-flowint8 / compiled-int8-flowint8attn add s3gen_quantize="int8" /
"int8-attn" (opt-in, change the audio). A mode the engine does not offer is recorded as "not available"; bf16 on CPU means bf16
T3 weights with fp32 math (our C++ kernel; without it the engine warns and T3 stays fp32). Each mode runs in its own subprocess by default (clean peak RSS /
GPU memory per mode; a crash or a hang (--mode-timeout, --budget-s) costs that mode only) and the JSON is rewritten
after every mode, so an interrupted run keeps what it measured.

Per mode: load_s (the engine compiles / captures at load when it warms up there); first_request_s (one full
generate: whatever compilation, CUDA-graph capture, allocator warm-up the load left);
T3 prefill ms and decode ms/token (median over the --tokens - 1 steps of each of --iters requests, timed between
the engine loop's per-token callbacks; CUDA events on GPU, no extra sync), tokens/s; achieved GB/s = bytes of T3
weights one decode step reads (every parameter/buffer of the 30 layers, final norm and speech head, at their actual
dtypes, int8 packed weights included; KV cache excluded and reported apart) / ms per token; the read bandwidth of
the same device (common.measure_read_bandwidth, x.sum() over 1 GiB; on CUDA also a device-to-device copy, on a CPU
with our kernels also a read of 8 streams per thread; the fastest is used), floor = bytes / bandwidth, roofline
ratio = ms per token / floor (1 = at the floor);
S3Gen flow and HiFT ms on the generated tokens; end to end = engine.generate (built-in voice, no watermark) wall ms
and RTF = wall / audio seconds; peak memory (CPU: peak RSS of the mode's process, getrusage; CUDA:
torch.cuda.max_memory_allocated, reset per mode). "stages" holds the per-stage ms of one request for plot.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

NOTE = ("RANDOM WEIGHTS (noise, not speech): speed is unaffected, the audio is noise. Every request is forced to "
        "--tokens speech tokens (stop id disabled, special ids folded into the speech vocabulary), see 'forcing'.")
TEXT = ("This is a benchmark sentence for the fast Chatterbox engine; its weights are random, so the audio it "
        "produces is noise, whatever the words say.")
SPEECH_VOCAB = 6561  # speech codes; ids >= this are SOS / EOS / never-trained
EXAGGERATION = 0.5
PRECISIONS = {"fp32": {}, "bf16": {"use_mixed_precision": True}, "int8": {"quantize": "int8"}}
MODES = {f"{c}-{p}": {"enable_compilation": c == "compiled", **opts}
         for c in ("eager", "compiled") for p, opts in PRECISIONS.items()}
# CPU fast modes: int8 T3 plus the opt-in int8 flow estimator GEMMs (+ int8 attention, AVX512-VNNI CPUs), or the
# bf16 estimator (CPUs with AMX)
MODES.update({f"compiled-int8-{name}": {"enable_compilation": True, "quantize": "int8", "s3gen_quantize": q}
              for name, q in (("flowint8", "int8"), ("flowint8attn", "int8-attn"), ("flowbf16", "bf16"))})
MODES["eager-int8-kv8"] = {"enable_compilation": False, "quantize": "int8", "kv_cache": "int8"}  # CPU: int8 KV cache
DEFAULT_MODES = {"cpu": "eager-fp32,compiled-fp32",  # on CPU bf16 = bf16 T3 weights, fp32 math (compiled-bf16)
                 "cuda": "eager-fp32,compiled-bf16,eager-bf16,compiled-fp32,compiled-int8"}  # most telling first


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- device helpers ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Timestamps on the device's timeline: CUDA events (recorded without a host sync) or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.points: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.points.append(e)
        else:
            self.points.append(time.perf_counter())

    def ms(self) -> list[float]:
        """Each mark's time in ms after the first one."""
        if not self.points:
            return []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [self.points[0].elapsed_time(e) for e in self.points]
        return [(t - self.points[0]) * 1e3 for t in self.points]


def cpu_kernels_loaded() -> bool:
    from chatterbox_fast import kernels

    return kernels.load()


def bandwidth(device: torch.device, size_mb: int) -> dict[str, float]:
    """Read bandwidth of `device` in GB/s; on CUDA also a device-to-device copy ((read + write) bytes / time), on a
    CPU with our kernels also a read of 8 interleaved streams per thread (one stream per thread is slower on some
    machines: 20-22 vs 26-32 GB/s on the 2-core VM). 'floor_gbs' is the fastest: the floor it gives is the lowest
    (the strictest) one."""
    size = size_mb << 20
    out = {"read_gbs": common.measure_read_bandwidth(size_bytes=size, repeats=5 if device.type == "cpu" else 20,
                                                     device=str(device))}
    if device.type == "cpu" and cpu_kernels_loaded():  # several streams per thread, as our decode kernels read
        out["read_multi_stream_gbs"] = common.measure_read_bandwidth(size_bytes=size, repeats=5, streams=8)
    if device.type == "cuda":
        src = torch.empty(size // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t = common.timeit(lambda: dst.copy_(src), warmup=2, iters=20, sync=True)
        out["copy_gbs"] = 2 * size / (t["min_ms"] * 1e-3) / 1e9
        del src, dst
        torch.cuda.empty_cache()
    out["floor_gbs"] = max(out.values())
    return out


def peak_memory(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # KiB on Linux
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["cuda_max_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return out


# ---- T3 bytes ---------------------------------------------------------------------------------------------------
def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def t3_weight_bytes(t3) -> tuple[int, dict[str, int]]:
    """Bytes of the weights one decode step reads: every parameter and buffer of the layers, the final norm and the
    speech head, at their actual dtypes (KV caches and RoPE tables excluded; int8 weights packed by torch.ao, which
    are neither parameters nor buffers, counted through `weight()`). The speech / position embeddings read one row
    per step and are left out. -> (total, bytes per dtype)."""
    from chatterbox_fast.generation.kv_cache import KVCache

    by_dtype: dict[str, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + _tensor_bytes(t)

    roots = [t3.tfmr.layers, t3.tfmr.norm, t3.speech_head]
    for root in roots:
        for m in root.modules():
            if isinstance(m, KVCache):
                continue
            for p in m.parameters(recurse=False):
                add(p)
            for b in m.buffers(recurse=False):
                add(b)
            packed = getattr(m, "_packed_params", None)
            if packed is not None and callable(getattr(m, "weight", None)):  # torch.ao dynamic quantized Linear
                w = m.weight()
                add(w)
                b = m.bias() if callable(getattr(m, "bias", None)) else None
                add(b)
    return sum(by_dtype.values()), by_dtype


def kv_read_bytes(t3, batch: int, n_pos: float) -> int:
    """K and V bytes one decode step reads attending over n_pos positions, all layers, at the cache's dtype (an int8
    cache's rows also carry one fp32 scale each)."""
    cfg = t3.cfg
    cache = t3.tfmr.layers[0].self_attn.kv_cache
    itemsize = cache.k_cache.element_size() if cache is not None else 4
    if cache is not None and cache.quantized:
        itemsize += 4 / cfg.head_dim
    return int(2 * cfg.n_layers * batch * cfg.n_heads * cfg.head_dim * n_pos * itemsize)


# ---- fixed-length requests --------------------------------------------------------------------------------------
@contextlib.contextmanager
def fixed_length():
    """Force every request to max_new_tokens tokens, all of them speech tokens (random weights would stop, or cut
    the sequence at a drawn SOS, at random). Yields a description of what was patched."""
    import chatterbox_fast.engine as engine_mod
    import chatterbox_fast.generation.decode as decode_mod

    if not hasattr(decode_mod, "STOP_SPEECH") or not hasattr(engine_mod, "clean_speech_tokens"):
        raise RuntimeError("the engine changed: generation.decode.STOP_SPEECH or engine.clean_speech_tokens is gone; "
                           "update fixed_length() in benchmarks/inference.py")
    old_stop, old_clean = decode_mod.STOP_SPEECH, engine_mod.clean_speech_tokens

    def keep_all(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(-1) % SPEECH_VOCAB

    decode_mod.STOP_SPEECH = -1
    engine_mod.clean_speech_tokens = keep_all
    try:
        yield {"stop_id": "generation.decode.STOP_SPEECH = -1 (never drawn): the loop runs max_new_tokens steps",
               "clean_up": "engine.clean_speech_tokens -> ids % 6561 (all tokens kept as speech tokens)"}
    finally:
        decode_mod.STOP_SPEECH = old_stop
        engine_mod.clean_speech_tokens = old_clean


class _TokenClock:
    """Stands in for the engine's verbose progress callback: one device timestamp per generated token."""

    current: Marks | None = None

    def __init__(self, total: int):
        self.marks = _TokenClock.current

    def __call__(self, i: int, _tok) -> None:
        self.marks.mark()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def token_clock(marks: Marks):
    """Time the engine's own generation loop: its verbose progress hook (`engine._Progress`, called once per
    token before the next step) records a device timestamp instead of printing."""
    import chatterbox_fast.engine as engine_mod

    if not hasattr(engine_mod, "_Progress"):
        raise RuntimeError("the engine changed: engine._Progress (per-token hook) is gone; update token_clock()")
    old = engine_mod._Progress
    engine_mod._Progress = _TokenClock
    _TokenClock.current = marks
    try:
        yield
    finally:
        engine_mod._Progress = old
        _TokenClock.current = None


# ---- stages -----------------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "mean": statistics.fmean(xs), "n": len(xs)}


def sampling_params(n_tokens: int):
    from chatterbox_fast.generation.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n_tokens)  # the reference's defaults (CFG 0.5, temperature 0.8, ...)


@torch.inference_mode()
def time_t3(engine, text_ids: torch.Tensor, n_tokens: int, seed: int) -> dict[str, Any]:
    """One request through engine.generate_tokens: prefill ms (call start -> first token, conditioning embeddings
    and the first draw included), per-step decode ms (between consecutive tokens), the speech tokens."""
    dev = engine.device
    conds = engine.conds.with_exaggeration(EXAGGERATION)
    marks = Marks(dev)
    gen = torch.Generator(dev).manual_seed(seed)
    sync(dev)
    t0 = time.perf_counter()
    with token_clock(marks):
        marks.mark()
        tokens = engine.generate_tokens(text_ids, conds, sampling_params(n_tokens), gen, verbose=True)
        marks.mark()  # after clean-up
    ms = marks.ms()
    wall = (time.perf_counter() - t0) * 1e3
    per_token = ms[1:-1]  # one mark per generated token
    steps = [b - a for a, b in zip(per_token, per_token[1:])]
    return {"prefill_ms": per_token[0] if per_token else None, "step_ms": steps, "wall_ms": wall,
            "tokens_generated": len(per_token), "tokens": tokens}


@torch.inference_mode()
def time_s3gen(engine, tokens: torch.Tensor, seed: int) -> dict[str, float]:
    """Flow (tokens + prompt -> mel) and HiFT (mel -> wav) separately, on the built-in voice."""
    dev = engine.device
    g = engine.conds.gen
    s3 = engine.s3gen
    gen = torch.Generator(dev).manual_seed(seed)
    tok = tokens.to(dev)
    sync(dev)
    t0 = time.perf_counter()
    mel = s3.flow.inference(tok, g.prompt_token, g.prompt_feat, g.embedding, generator=gen)
    sync(dev)
    t1 = time.perf_counter()
    wav, _ = s3.mel2wav(mel, None, None, generator=gen)
    sync(dev)
    t2 = time.perf_counter()
    return {"flow_ms": (t1 - t0) * 1e3, "hift_ms": (t2 - t1) * 1e3, "mel_frames": int(mel.shape[-1]),
            "samples": int(wav.shape[-1])}


def time_e2e(engine, text: str, n_tokens: int, seed: int) -> dict[str, float]:
    """engine.generate (text -> wav on the host), wall ms and RTF."""
    dev = engine.device
    sync(dev)
    t0 = time.perf_counter()
    wav = engine.generate(text, exaggeration=EXAGGERATION, max_new_tokens=n_tokens, seed=seed)
    sync(dev)
    wall = (time.perf_counter() - t0) * 1e3
    audio_s = wav.shape[-1] / engine.sr
    return {"wall_ms": wall, "audio_s": audio_s, "rtf": wall / 1e3 / audio_s if audio_s else None}


# ---- one mode ---------------------------------------------------------------------------------------------------
def supports_quantize() -> bool:
    from chatterbox_fast import OptimizedChatterboxTTS

    return "quantize" in inspect.signature(OptimizedChatterboxTTS.from_local).parameters


def load_engine(ckpt: Path, device: torch.device, options: dict[str, Any]):
    """The engine of a mode, with speculative decoding off: this script times T3's decode step against its weight
    floor, one token per step (the speculative decoder emits tokens in bursts; benchmarks/compare.py times it)."""
    from chatterbox_fast import OptimizedChatterboxTTS

    if "speculative" in inspect.signature(OptimizedChatterboxTTS.from_local).parameters:
        options = {"speculative": None, **options}
    return OptimizedChatterboxTTS.from_local(ckpt, device=str(device), enable_watermark=False, **options)


def engine_info(engine) -> dict[str, Any]:
    step = getattr(engine, "_step_fn", None)
    info: dict[str, Any] = {"step_fn": type(step).__name__ if step is not None else "decode_one_token (eager)"}
    for attr in ("is_compiled", "fallback_reason", "mode", "freezing"):
        if hasattr(step, attr):
            info[f"step_{attr}"] = getattr(step, attr)
    if hasattr(step, "logits_fn"):  # CUDA-graph step: compiled logits inside, or the eager ones
        info["step_logits_fn"] = getattr(step.logits_fn, "__name__", type(step.logits_fn).__name__)
    info["cuda_graphs"] = getattr(engine, "cuda_graphs", None)
    dtypes: dict[str, int] = {}
    for p in engine.t3.parameters():
        dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
    info["t3_param_numel_by_dtype"] = dtypes
    return info


def shorten_voice(engine, n_tokens: int) -> None:
    """Cut the built-in voice's S3Gen prompt to its first n_tokens tokens (2 n mel frames): cheaper CPU runs."""
    from chatterbox_fast.conditioning import Conditionals, GenCond

    c = engine.conds
    g = c.gen
    engine.conds = Conditionals(c.t3, GenCond(g.prompt_token[:, :n_tokens].contiguous(),
                                              g.prompt_feat[:, :2 * n_tokens].contiguous(), g.embedding))


def run_mode(name: str, args, result: dict[str, Any], save: Callable[[], None] = lambda: None,
             loader: Callable | None = None) -> None:
    """Measure one mode, filling `result` in place stage by stage (save() after each, so a crash or a kill
    leaves what was measured). Raises on failure; the caller records the error."""
    options = dict(MODES[name])
    device = torch.device(args.device)
    result.update(mode=name, status="running", options=options)
    if "quantize" in options and not supports_quantize():
        result.update(status="not available",
                      reason="OptimizedChatterboxTTS.from_local has no quantize= option in this version")
        return
    n = args.tokens
    tag = f"[{name}]"

    log(f"{tag} read bandwidth ({args.bandwidth_mb} MiB) ...")
    result["bandwidth"] = {"before": bandwidth(device, args.bandwidth_mb)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    log(f"{tag} loading {args.ckpt} ...")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = (loader or load_engine)(args.ckpt, device, options)
    sync(device)
    result["load_s"] = time.perf_counter() - t0
    seen = [f"{w.category.__name__}: {w.message}" for w in caught
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]  # torch's own noise
    result["load_warnings"] = list(dict.fromkeys(seen))
    result["rss_gb_after_load"] = common.rss_gb()
    if args.prompt_tokens:
        shorten_voice(engine, args.prompt_tokens)
    if engine.conds is None:
        raise RuntimeError("the checkpoint has no built-in voice (conds.pt)")
    result["voice"] = {"t3_prompt_tokens": int(engine.conds.t3.prompt_tokens.shape[1]),
                       "s3gen_prompt_tokens": int(engine.conds.gen.prompt_token.shape[1])}
    wbytes, by_dtype = t3_weight_bytes(engine.t3)
    result["t3_weight_bytes"] = wbytes
    result["t3_weight_bytes_by_dtype"] = by_dtype
    log(f"{tag} loaded in {result['load_s']:.1f} s; T3 weights read per token {wbytes / 1e9:.3f} GB {by_dtype}")
    save()

    text_ids = engine.tokenizer.prepare(args.text).ids
    result["prefill_len"] = int(text_ids.shape[1]) + engine.t3.cfg.cond_len + 2
    with fixed_length() as forcing:
        result["forcing"] = forcing
        log(f"{tag} first request ({n} tokens; compilation / capture not done at load happen here) ...")
        t0 = time.perf_counter()
        first = time_e2e(engine, args.text, n, args.seed)
        result["first_request_s"] = time.perf_counter() - t0
        result["first_request"] = first
        result["engine"] = engine_info(engine)
        log(f"{tag} first request {result['first_request_s']:.1f} s ({first['audio_s']:.2f} s of audio)")
        save()

        t3_runs = []
        for i in range(args.iters):
            r = time_t3(engine, text_ids, n, args.seed)
            t3_runs.append(r)
            log(f"{tag} T3 {i + 1}/{args.iters}: prefill {r['prefill_ms']:.1f} ms, decode "
                f"{statistics.median(r['step_ms']) if r['step_ms'] else float('nan'):.2f} ms/token (median of "
                f"{len(r['step_ms'])} steps), {r['tokens_generated']} tokens")
        steps = [s for r in t3_runs for s in r["step_ms"]]
        gen_count = t3_runs[-1]["tokens_generated"]
        tokens = t3_runs[-1]["tokens"]
        dec = _stats(steps)
        t3 = {
            "prefill_ms": _stats([r["prefill_ms"] for r in t3_runs if r["prefill_ms"] is not None]),
            "decode_ms_per_token": dec,
            "decode_steps_per_request": len(t3_runs[-1]["step_ms"]),
            "tokens_generated": gen_count,
            "stopped_early": gen_count < n,
            "wall_ms": _stats([r["wall_ms"] for r in t3_runs]),
        }
        if dec:
            t3["tokens_per_s"] = 1e3 / dec["median"]
        result["t3"] = t3
        save()

        s3_runs = []
        for i in range(args.iters):
            r = time_s3gen(engine, tokens, args.seed)
            s3_runs.append(r)
            log(f"{tag} S3Gen {i + 1}/{args.iters}: flow {r['flow_ms']:.0f} ms, HiFT {r['hift_ms']:.0f} ms "
                f"({tokens.numel()} tokens, {r['mel_frames']} mel frames)")
        result["s3gen"] = {"speech_tokens": int(tokens.numel()), "mel_frames": s3_runs[-1]["mel_frames"],
                           "flow_ms": _stats([r["flow_ms"] for r in s3_runs]),
                           "hift_ms": _stats([r["hift_ms"] for r in s3_runs])}
        save()

        e2e_runs = []
        for i in range(args.iters):
            r = time_e2e(engine, args.text, n, args.seed)
            e2e_runs.append(r)
            log(f"{tag} end to end {i + 1}/{args.iters}: {r['wall_ms']:.0f} ms for {r['audio_s']:.2f} s of audio, "
                f"RTF {r['rtf']:.3f}")
        wall = _stats([r["wall_ms"] for r in e2e_runs])
        audio_s = e2e_runs[-1]["audio_s"]
        result["e2e"] = {"wall_ms": wall, "audio_s": audio_s, "rtf": wall["median"] / 1e3 / audio_s if audio_s else None}
        # what the first request cost beyond a warm one: compilation, graph capture, allocator / kernel warm-up
        result["first_request_overhead_s"] = result["first_request_s"] - wall["median"] / 1e3
    result["memory"] = peak_memory(device)
    save()

    log(f"{tag} read bandwidth again ...")
    result["bandwidth"]["after"] = bandwidth(device, args.bandwidth_mb)
    bw = max(result["bandwidth"]["before"]["floor_gbs"], result["bandwidth"]["after"]["floor_gbs"])
    result["bandwidth"]["floor_gbs"] = bw
    if dec:
        ms = dec["median"]
        batch = 2  # CFG
        mean_pos = result["prefill_len"] + n / 2
        kv = kv_read_bytes(engine.t3, batch, mean_pos)
        floor_ms = wbytes / (bw * 1e9) * 1e3
        result.update(
            achieved_gbs=wbytes / (ms * 1e-3) / 1e9,
            floor_ms_per_token=floor_ms,
            roofline_ratio=ms / floor_ms,
            kv_read_bytes_per_token_mean=kv,
            floor_with_kv_ms_per_token=(wbytes + kv) / (bw * 1e9) * 1e3,
        )
    result["stages"] = {
        "t3_prefill_ms": t3["prefill_ms"]["median"] if t3["prefill_ms"] else None,
        "t3_decode_ms": dec["median"] * t3["decode_steps_per_request"] if dec else None,
        "flow_ms": result["s3gen"]["flow_ms"]["median"],
        "hift_ms": result["s3gen"]["hift_ms"]["median"],
    }
    result["status"] = "ok"
    save()
    del engine
    gc.collect()


# ---- driver -----------------------------------------------------------------------------------------------------
def child_main(args) -> None:
    """One mode in this process (the subprocess side of the isolated run): results go to --child-out."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    result: dict[str, Any] = {}
    save = lambda: common.write_json(args.child_out, result)  # noqa: E731
    try:
        run_mode(args.child_mode, args, result, save)
    except BaseException as err:  # noqa: BLE001 - recorded; the parent decides what happens next
        result.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
        save()
        log(f"[{args.child_mode}] ERROR {type(err).__name__}: {err}")
        raise SystemExit(1)
    save()


def run_isolated(name: str, args, timeout_s: float | None) -> dict[str, Any]:
    """Run one mode in a subprocess (own session, so a timeout kills it and its compile workers, nothing else);
    its output is echoed live; returns its result file, with the error / timeout added."""
    out = Path(args.workdir) / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-mode", name, "--child-out", str(out),
           *args.child_argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, cwd=ROOT)
    tail: deque[str] = deque(maxlen=40)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"  {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except BaseException:  # interrupted ourselves: take the child down with us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    reader.join(timeout=10)
    result: dict[str, Any] = {"mode": name}
    if out.is_file():
        try:
            result = json.loads(out.read_text())
        except ValueError:
            pass
    result["returncode"] = proc.returncode
    if timed_out:
        result.update(status="timeout", error=f"killed after {timeout_s:.0f} s (--mode-timeout / --budget-s); "
                                              "the fields present were measured before")
    elif proc.returncode != 0 and result.get("status") in (None, "running"):
        result.update(status="error", error=f"subprocess exited with {proc.returncode}", output_tail=list(tail))
    return result


def summary_rows(modes: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for name, r in modes.items():
        g = lambda *keys: _get(r, *keys)  # noqa: E731
        mem = g("memory", "cuda_max_allocated_gb") if g("memory", "cuda_max_allocated_gb") is not None \
            else g("memory", "peak_rss_gb")
        rows.append({
            "mode": name, "status": r.get("status"), "load_s": g("load_s"), "first_request_s": g("first_request_s"),
            "prefill_ms": g("t3", "prefill_ms", "median"), "ms_per_token": g("t3", "decode_ms_per_token", "median"),
            "tokens_per_s": g("t3", "tokens_per_s"), "achieved_gbs": g("achieved_gbs"),
            "roofline_ratio": g("roofline_ratio"), "flow_ms": g("s3gen", "flow_ms", "median"),
            "hift_ms": g("s3gen", "hift_ms", "median"), "e2e_ms": g("e2e", "wall_ms", "median"),
            "audio_s": g("e2e", "audio_s"), "rtf": g("e2e", "rtf"), "peak_mem_gb": mem,
            "error": r.get("error") or r.get("reason"),
        })
    return rows


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def print_table(rows: list[dict[str, Any]], device: str) -> None:
    cols = [("mode", "mode", "{}"), ("load s", "load_s", "{:.1f}"), ("1st req s", "first_request_s", "{:.1f}"),
            ("prefill ms", "prefill_ms", "{:.1f}"), ("ms/tok", "ms_per_token", "{:.2f}"),
            ("tok/s", "tokens_per_s", "{:.1f}"), ("GB/s", "achieved_gbs", "{:.1f}"),
            ("x floor", "roofline_ratio", "{:.2f}"), ("flow ms", "flow_ms", "{:.0f}"), ("HiFT ms", "hift_ms", "{:.0f}"),
            ("e2e ms", "e2e_ms", "{:.0f}"), ("audio s", "audio_s", "{:.2f}"), ("RTF", "rtf", "{:.3f}"),
            ("peak GB", "peak_mem_gb", "{:.2f}")]
    print(f"\n{NOTE}\nDevice {device}. peak GB: CUDA max_memory_allocated on GPU, peak RSS of the mode's process on CPU.",
          flush=True)
    print("".join(f"{h:>11}" if i else f"{h:<16}" for i, (h, _, _) in enumerate(cols)))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['mode']:<16}{str(r['status']).upper()}: {str(r['error'])[:200]}")
            continue
        cells = []
        for i, (_, key, fmt) in enumerate(cols):
            v = r.get(key)
            s = "-" if v is None else fmt.format(v)
            cells.append(f"{s:>11}" if i else f"{s:<16}")
        print("".join(cells))
    sys.stdout.flush()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)} (default: CPU "
                    f"{DEFAULT_MODES['cpu']}; CUDA {DEFAULT_MODES['cuda']}; run in this order)")
    ap.add_argument("--ckpt", "--ckpt-dir", dest="ckpt", type=Path, default=None,
                    help="checkpoint folder (default: the oracle's random-weight one, tests/reference/oracle_paths)")
    ap.add_argument("--tokens", type=int, default=None, help="speech tokens per request (default 250 = 10 s; "
                                                             "--quick: 24)")
    ap.add_argument("--iters", type=int, default=None, help="timed requests per stage (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="few tokens, one timed request per stage")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="cut the built-in voice's S3Gen prompt to this many tokens (0: keep it, 9.5 s)")
    ap.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the bandwidth probe")
    ap.add_argument("--in-process", action="store_true",
                    help="run the modes in this process (peak RSS then accumulates over modes)")
    ap.add_argument("--mode-timeout", type=float, default=0, help="seconds per mode, then it is killed (0: none)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="total seconds: later modes are skipped, a running one killed, when it is spent (0: none)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/inference-<device>-<time>.json)")
    ap.add_argument("--child-mode", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.modes = [m.strip() for m in (a.modes or DEFAULT_MODES[a.device]).split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad or not a.modes:
        ap.error(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    a.tokens = a.tokens or (24 if a.quick else 250)
    a.iters = a.iters or (1 if a.quick else 3)
    if a.tokens < 2 or a.iters < 1 or a.threads < 1 or a.bandwidth_mb < 1:
        ap.error("need --tokens >= 2, --iters >= 1, --threads >= 1, --bandwidth-mb >= 1")
    if a.ckpt is None:
        sys.path.insert(0, str(ROOT / "tests" / "reference"))
        import oracle_paths

        a.ckpt = oracle_paths.ckpt_dir()
    if not (a.ckpt / "t3_cfg.safetensors").is_file():
        ap.error(f"no t3_cfg.safetensors in {a.ckpt}")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available in this torch build")
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child_mode:
        child_main(args)
        return 0
    # the children get the same settings, resolved (one mode each, no output file of their own)
    args.child_argv = ["--device", args.device, "--ckpt", str(args.ckpt), "--tokens", str(args.tokens),
                       "--iters", str(args.iters), "--threads", str(args.threads), "--text", args.text,
                       "--seed", str(args.seed), "--prompt-tokens", str(args.prompt_tokens),
                       "--bandwidth-mb", str(args.bandwidth_mb)]
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"inference-{args.device}-{stamp}.json"
    t_start = time.monotonic()
    data: dict[str, Any] = {
        "benchmark": "inference",
        "note": NOTE,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/inference.py", *argv]),
        "machine": common.machine_info(),
        "load_average_before": os.getloadavg(),
        "device": args.device,
        "settings": {"tokens": args.tokens, "audio_s_per_request": args.tokens * 0.04, "iters": args.iters,
                     "threads": args.threads, "text": args.text, "seed": args.seed, "quick": args.quick,
                     "prompt_tokens": args.prompt_tokens or "full built-in voice", "ckpt": str(args.ckpt),
                     "isolated": not args.in_process, "exaggeration": EXAGGERATION,
                     "sampling": "engine defaults (the reference's): temperature 0.8, cfg 0.5, rep. penalty 1.2, "
                                 "min_p 0.05, top_p 1.0"},
        "modes": {},
    }
    log(f"benchmarks/inference.py on {args.device}, modes {', '.join(args.modes)}; {args.tokens} tokens per request, "
        f"{args.iters} timed request(s) per stage.\n{NOTE}")

    def on_term(signum, _frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cbf-inference-") as workdir:
        args.workdir = workdir
        try:
            for name in args.modes:
                elapsed = time.monotonic() - t_start
                left = args.budget_s - elapsed if args.budget_s else None
                if left is not None and left < 30:
                    data["modes"][name] = {"mode": name, "status": "skipped",
                                           "error": f"--budget-s {args.budget_s:.0f} spent ({elapsed:.0f} s)"}
                    log(f"[{name}] skipped: budget spent")
                    continue
                timeout = min(x for x in (args.mode_timeout or None, left) if x) if (args.mode_timeout or left) \
                    else None
                log(f"== {name} ==" + (f" (timeout {timeout:.0f} s)" if timeout else ""))
                t0 = time.monotonic()
                if args.in_process:
                    result: dict[str, Any] = {}
                    try:
                        run_mode(name, args, result)
                    except Exception as err:  # noqa: BLE001 - one mode failing must not stop the others
                        result.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                                      traceback=traceback.format_exc()[-4000:])
                        log(f"[{name}] ERROR {type(err).__name__}: {err}")
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                else:
                    result = run_isolated(name, args, timeout)
                result["mode_wall_s"] = time.monotonic() - t0
                data["modes"][name] = result
                log(f"[{name}] {result.get('status')} in {result['mode_wall_s']:.0f} s")
                data["summary"] = summary_rows(data["modes"])
                common.write_json(out, data)  # after every mode: an interrupted run keeps what it measured
        finally:
            data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            data["load_average_after"] = os.getloadavg()
            data["summary"] = summary_rows(data["modes"])
            common.write_json(out, data)
    print_table(data["summary"], args.device)
    log(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
