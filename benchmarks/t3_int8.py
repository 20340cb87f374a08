"""T3 weight-only int8 (`quantize_t3`): kernel choice, decode ms/token against the int8 floor, drift vs fp32.

    flock /tmp/cbf-heavy.lock .venv/bin/python benchmarks/t3_int8.py --threads 2

WEIGHTS ARE RANDOM (the oracle's checkpoint, official shapes): speed does not depend on the values; the drift
numbers are a weak proxy for real weights (random logits are flat and the int8 rounding error of random Gaussian
weights is not that of trained weights, whose rows have outliers that widen the per-channel scale).

Three parts, one run:
1. kernels: the 210 linears of T3's 30 layers (q/k/v/o 1024x1024, gate/up 4096x1024, down 1024x4096) at batch 2
   (one CFG decode step), random weights, every candidate timed over all layers in --kernel-rounds interleaved
   rounds (median of the per-round ratios to fp32 F.linear): fp32 and
   bf16 `F.linear`, `_weight_int8pack_mm` with bf16 and with fp32 activations, fbgemm dynamic int8
   (`torch.ao.nn.quantized.dynamic.Linear`), the generic dequantise-and-matmul fallback, and our C++ kernels
   (src/chatterbox_fast/kernels: int8 and bf16 weights, fp32 activations and math) when they build.
2. decode: fp32 eager, int8 eager and int8 compiled (`compile_decode_step` defaults: inductor, no freezing; other
   compile modes with --int8-modes, e.g. autotune-freezing = max-autotune C++ GEMM + freezing), the
   --steps timed steps split into --rounds interleaved rounds with one read-bandwidth probe per round (as
   benchmarks/t3_decode.py). Floor = bytes of linear weights read per token (int8 layers + scales + the fp32
   speech head; for fp32 every linear) / the probe's bandwidth. Resident bytes: the Int8Linear buffers, and the
   process RSS before / after compiling (a constant-folded fp32 copy would add ~2 GB).
--format bf16 runs parts 2-3 on a bf16-weight model instead (quantize_t3(..., "bf16"): what use_mixed_precision
selects on CPU); the labels then read "bf16 ..." (the JSON keys keep their int8 names).
3. drift: teacher-forced next-token distributions of int8 vs fp32 over --drift-steps positions after the prefill
   (the same pseudo-random speech tokens fed to both, 32 positions per forward), processed as the sampler does
   (CFG, repetition penalty, temperature, min-p): total variation distance, KL(fp32 || int8) of the temperature
   softmax before min-p, and top-1 agreement.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import t3_decode  # noqa: E402
from chatterbox_fast import kernels as cpu_kernels  # noqa: E402
from chatterbox_fast.config import T3Config  # noqa: E402
from chatterbox_fast.generation.sampling import SamplingParams, process_logits  # noqa: E402
from chatterbox_fast.models.t3 import T3  # noqa: E402
from chatterbox_fast.quantize import (KV_CACHE_DTYPES, Bf16Linear, Int8Linear, int8_linear_bytes,  # noqa: E402
                                      low_precision_linear_bytes, pack_t3, quantize_t3, quantize_weight_int8)

NOTE = ("weights are random (oracle checkpoint, official shapes): speed is unaffected; drift on random weights is "
        "a weak proxy for drift on the released weights")
PARAMS = SamplingParams()  # the reference's defaults: temperature 0.8, CFG 0.5, penalty 1.2, min-p 0.05


# ---- 1. kernels ---------------------------------------------------------------------------------------------------
def layer_shapes(cfg: T3Config) -> list[tuple[int, int]]:
    """(out, in) of the seven linears of one layer."""
    d, h = cfg.dim, cfg.intermediate_size
    return [(d, d)] * 4 + [(h, d), (h, d), (d, h)]


def time_kernels(cfg: T3Config, batch: int, rounds: int, skip_slow: bool) -> dict:
    """ms for one pass over all n_layers x 7 linears at (batch, K) inputs, per kernel.

    Every kernel's weights are built first; then `rounds` rounds each time one pass of every kernel (rotating
    order) and one bandwidth probe, so that kernels are compared under the same machine state (on a shared VM the
    steal time changes by the minute). Reported: min and median over rounds, and the median of the per-round ratio
    to fp32 F.linear. The slow kernels (fp32 activations into the int8 kernel, the generic dequantise path) run in
    the first round only.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = layer_shapes(cfg) * cfg.n_layers
    xs = {k: torch.randn(batch, k, generator=gen) for k in {s[1] for s in shapes}}
    int8pack = torch.ops.aten._weight_int8pack_mm

    def q8(w):
        q, s = quantize_weight_int8(w)
        return q, s, s.to(torch.bfloat16)

    def dyn(w):
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
        return DynLinear.from_float(lin)

    kernels = {  # name -> (build from an fp32 weight, forward, slow)
        "fp32 F.linear": (lambda w: w, lambda w, x: F.linear(x, w), False),
        "bf16 F.linear": (lambda w: w.bfloat16(), lambda w, x: F.linear(x.bfloat16(), w).float(), False),
        "int8pack_mm bf16 act": (q8, lambda w, x: int8pack(x.bfloat16(), w[0], w[2]).float(), False),
        "fbgemm dynamic int8": (dyn, lambda w, x: w(x), False),
        "int8pack_mm fp32 act": (q8, lambda w, x: int8pack(x, w[0], w[1]), True),
        "dequant + fp32 F.linear": (q8, lambda w, x: F.linear(x, w[0].float()) * w[1], True),
    }
    if cpu_kernels.load():  # ours (src/chatterbox_fast/kernels/cpu_linear.cpp): fp32 activations, fp32 math
        ops = torch.ops.chatterbox_fast
        kernels["ours int8 (cpu_linear)"] = (q8, lambda w, x: ops.int8_linear(x, w[0], w[1]), False)
        kernels["ours bf16 weights (cpu_linear)"] = (lambda w: w.bfloat16(), lambda w, x: ops.bf16_linear(x, w), False)
    if skip_slow:
        kernels = {k: v for k, v in kernels.items() if not v[2]}
    out: dict = {}
    built = {}
    fp32_ws = [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]
    for name, (build, fwd, _) in kernels.items():
        try:
            ws = [build(w) for w in fp32_ws] if name != "fp32 F.linear" else fp32_ws
            [fwd(w, xs[k]) for w, (_, k) in zip(ws, shapes)]  # warm-up
            built[name] = ws
            out[name] = {"weight_bytes": sum(_bytes(w) for w in ws), "ms": []}
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    bws = []
    names = list(built)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if kernels[name][2] and r > 0:
                continue
            ws, fwd = built[name], kernels[name][1]
            t0 = time.perf_counter()
            [fwd(w, xs[k]) for w, (_, k) in zip(ws, shapes)]
            out[name]["ms"].append((time.perf_counter() - t0) * 1e3)
        bws.append(common.measure_read_bandwidth(repeats=3))
    for name in names:
        o = out[name]
        o["min_ms"], o["median_ms"] = min(o["ms"]), statistics.median(o["ms"])
        o["gbs"] = o["weight_bytes"] / (o["min_ms"] * 1e-3) / 1e9
        base = out["fp32 F.linear"]["ms"]
        o["speedup_vs_fp32_median"] = statistics.median(b / m for b, m in zip(base, o["ms"]))
        print(f"  {name:<26}{o['min_ms']:8.1f} ms min {o['median_ms']:8.1f} median  "
              f"({o['weight_bytes'] / 1e9:.3f} GB, {o['gbs']:.1f} GB/s at min; "
              f"{o['speedup_vs_fp32_median']:.2f}x fp32)", flush=True)
    out["_bandwidth_gbs_per_round"] = bws
    return out


def _bytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if isinstance(w, tuple):
        return sum(_bytes(t) for t in w[:2])  # int8 weight + fp32 scales (the bf16 copy is what the kernel reads)
    p = w._packed_params._weight_bias()[0]  # torch.ao dynamic Linear: the packed qint8 weight
    return p.numel() * p.element_size()


# ---- 2. decode ----------------------------------------------------------------------------------------------------
def read_bytes_per_token(model: T3) -> int:
    """Bytes of linear weights one decode step reads: the layers' linears (float or int8 + the scales the kernel
    reads) and the speech head."""
    n = 0
    for m in model.tfmr.layers.modules():
        if isinstance(m, torch.nn.Linear):
            n += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):  # our kernel reads the fp32 scales, ATen's the bf16 copy
            n += m.weight_int8.numel() + m.scale.numel() * (4 if cpu_kernels.available() else 2)
        elif isinstance(m, Bf16Linear):
            n += m.weight_bf16.numel() * 2
    w = model.speech_head.weight
    return n + w.numel() * w.element_size()


def float_linear_bytes(model: T3) -> int:
    """Bytes of float nn.Linear weights left in the layers (0 after quantize_t3)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.tfmr.layers.modules()
               if isinstance(m, torch.nn.Linear))


# ---- 3. drift -----------------------------------------------------------------------------------------------------
def teacher_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """n deterministic pseudo-random speech codes (< 6561): the forced continuation."""
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def teacher_forced_logits(model: T3, x: torch.Tensor, tokens: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """x (B, S, D) prefill embeddings, tokens (n,) forced speech tokens -> raw speech logits (n + 1, B, V): the
    distribution after the prefill, then after each forced token.

    The prefill runs as in generation; the forced tokens are fed `chunk` positions at a time over the KV cache
    (B * chunk rows <= quantize.CPU_KERNEL_MAX_ROWS, so int8 layers run the decode kernel, bf16 activations and
    all, not the prefill path): the quantities the decode loop computes one token at a time, at a fraction of its
    cost.
    """
    from chatterbox_fast.quantize import CPU_KERNEL_MAX_ROWS

    n, (B, S, _) = tokens.shape[0], x.shape
    if B * chunk > CPU_KERNEL_MAX_ROWS:
        raise ValueError(f"chunk {chunk} x batch {B} rows > CPU_KERNEL_MAX_ROWS {CPU_KERNEL_MAX_ROWS}")
    model.setup_caches(B, S + n)
    h = model.forward_hidden(x, torch.arange(S))
    out = [model.speech_logits(h[:, -1:])]  # (B, 1, V)
    pos = torch.arange(1, n + 1)  # learned speech positions of generated tokens start at 1
    e = (model.speech_emb(tokens) + model.speech_pos_emb.emb(pos)).to(x.dtype)  # (n, D)
    e = e.unsqueeze(0).expand(B, n, -1)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        h = model.forward_hidden(e[:, c0:c1].contiguous(), torch.arange(S + c0, S + c1), S + n)
        out.append(model.speech_logits(h))  # (B, c, V)
    return torch.cat(out, dim=1).transpose(0, 1)  # (n + 1, B, V)


@torch.inference_mode()
def distribution_drift(ref: torch.Tensor, test: torch.Tensor, tokens: torch.Tensor,
                       params: SamplingParams = PARAMS) -> dict:
    """Compare processed next-token distributions step by step. ref / test (n + 1, B, V) raw logits; the
    repetition-penalty set grows with the forced tokens (BOS first), as in generation."""
    from chatterbox_fast.constants import START_SPEECH

    V = ref.shape[-1]
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, START_SPEECH] = True
    tv, kl, top1 = [], [], []
    for i in range(ref.shape[0]):
        pr = torch.softmax(process_logits(ref[i], seen, params), -1)
        pt = torch.softmax(process_logits(test[i], seen, params), -1)
        tv.append(0.5 * (pr - pt).abs().sum().item())
        nomin = SamplingParams(temperature=params.temperature, cfg_weight=params.cfg_weight,
                               repetition_penalty=params.repetition_penalty, min_p=0.0, top_p=1.0)
        lr = torch.log_softmax(process_logits(ref[i], seen, nomin), -1)
        lt = torch.log_softmax(process_logits(test[i], seen, nomin), -1)
        kl.append((lr.exp() * (lr - lt)).sum().item())
        top1.append(bool(pr.argmax() == pt.argmax()))
        if i < tokens.shape[0]:
            seen[0, tokens[i]] = True
    return {"steps": len(tv), "tv_mean": statistics.mean(tv), "tv_max": max(tv), "kl_mean": statistics.mean(kl),
            "kl_max": max(kl), "top1_agreement": sum(top1) / len(top1), "tv": tv}


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps per implementation")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--kernel-rounds", type=int, default=8)
    ap.add_argument("--drift-steps", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=60)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: kernels,decode,drift,slow-kernels")
    ap.add_argument("--compile-timeout", type=int, default=1200)
    ap.add_argument("--int8-modes", default="eager,compiled",
                    help=f"int8 modes, comma-separated, from benchmarks/t3_decode.py's {sorted(t3_decode.MODES)}")
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--format", choices=("int8", "bf16"), default="int8",
                    help="weight format of the converted model in parts 2-3 (quantize_t3 mode; bf16 = bf16 weights, "
                         "fp32 math, what use_mixed_precision selects on CPU)")
    ap.add_argument("--kv-dtype", choices=("fp32", "bf16", "int8"), default="bf16",
                    help="KV cache of the converted model: bf16 is what the engine uses in its low-precision CPU modes "
                         "(when our decode attention is built for this CPU); fp32 as before session 8; int8 the "
                         "opt-in kv_cache='int8' (per-row scales)")
    ap.add_argument("--also-kv", default="", help="comma-separated KV cache dtypes (fp32, bf16, int8): each int8 "
                    "mode is also timed on a copy of the converted model with that cache, interleaved")
    ap.add_argument("--start-pos", type=int, default=0, help="decode from this many positions past the prefill "
                    "(the skipped cache slots hold zeros: the same bytes to read as real keys): the KV cache's "
                    "share of a step grows with the position")
    ap.add_argument("--unpacked-drift", action="store_true",
                    help="measure the drift on row-major int8 weights (the module path's fp32-math kernel) instead "
                         "of the packed layout the CPU engine runs (int16 activations in AVX-512 builds)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "t3_int8.json")
    a = ap.parse_args(argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    a.int8_modes = [m.strip() for m in a.int8_modes.split(",") if m.strip()]
    a.also_kv = [k.strip() for k in a.also_kv.split(",") if k.strip()]
    if any(k not in KV_CACHE_DTYPES for k in a.also_kv) or a.start_pos < 0:
        ap.error("--also-kv takes fp32, bf16, int8; --start-pos must be >= 0")
    bad = [m for m in a.int8_modes if m not in t3_decode.MODES]
    if bad:
        ap.error(f"unknown --int8-modes {bad}")
    if a.rounds < 1 or a.steps < a.rounds:
        ap.error("need --rounds >= 1 and --steps >= --rounds")
    import oracle_paths  # tests/reference, put on sys.path by t3_decode

    a.ckpt = a.ckpt or oracle_paths.ckpt_dir()
    return a


def run_decode(args, fp32: T3, int8: T3, x: torch.Tensor) -> dict:
    S = x.shape[0 + 1]
    S0 = S + args.start_pos  # first decode position
    chunk = args.steps // args.rounds
    max_seq = S0 + args.warmup + chunk * args.rounds + 2
    dargs = argparse.Namespace(threads=args.threads)
    impls = {}
    runs = [("fp32 eager", fp32, "eager")] + [(f"{args.format} {m}", int8, m) for m in args.int8_modes]
    if "fused" in args.int8_modes:  # the engine's layout for the fused step, set before any mode compiles
        pack_t3(int8)
    for kv in args.also_kv:  # the same converted weights over another KV cache dtype
        other = copy.deepcopy(int8)
        other.kv_dtype = KV_CACHE_DTYPES[kv]
        runs += [(f"{args.format} {m} kv-{kv}", other, m) for m in args.int8_modes]
    for name, model, mode in runs:
        model.setup_caches(2, max_seq)
        o = t3_decode.Ours(model, mode, S, dargs)
        rss0 = common.rss_gb()
        if o.step.is_compiled:
            print(f"{name}: compiling ...", flush=True)
            o.compile(args.compile_timeout)
        impls[name] = {"ours": o, "compile_s": o.compile_s, "compiled": o.step.is_compiled,
                       "fallback_reason": o.step.fallback_reason, "rss_before_gb": rss0,
                       "rss_after_gb": common.rss_gb(), "read_bytes_per_token": read_bytes_per_token(model)}
        if o.compile_s is not None:
            print(f"  compiled in {o.compile_s:.0f} s (compiled={o.step.is_compiled}); RSS {rss0:.2f} -> "
                  f"{impls[name]['rss_after_gb']:.2f} GB", flush=True)
        if args.warmup:
            o.run(args.warmup, S0)
    rounds = []
    for r in range(args.rounds):
        pos = S0 + args.warmup + r * chunk
        order = list(impls) + ["bandwidth"]
        k = r % len(order)
        rd: dict = {"pos": pos}
        for name in order[k:] + order[:k]:
            if name == "bandwidth":
                rd["bandwidth_gbs"] = common.measure_read_bandwidth(repeats=3)
                rd.update(t3_decode.multi_stream_bandwidth())
            else:
                rd[name] = impls[name]["ours"].run(chunk, pos)
        rounds.append(rd)
        line = "  ".join(f"{n} {statistics.median(rd[n]['step_ms']):.1f}" for n in impls)
        multi = f", {rd['bandwidth_multi_gbs']:.1f} GB/s multi-stream" if "bandwidth_multi_gbs" in rd else ""
        print(f"round {r + 1}/{args.rounds}: {line} ms/token; {rd['bandwidth_gbs']:.1f} GB/s{multi}", flush=True)
    bw = statistics.median(rd["bandwidth_gbs"] for rd in rounds)
    summary = {}
    for name, v in impls.items():
        nbytes = v["read_bytes_per_token"]
        per_round = [statistics.median(rd[name]["step_ms"]) for rd in rounds]
        floors = [nbytes / (rd["bandwidth_gbs"] * 1e9) * 1e3 for rd in rounds]
        summary[name] = {
            "ms_per_token": statistics.median([t for rd in rounds for t in rd[name]["step_ms"]]),
            "ms_per_token_min": min(t for rd in rounds for t in rd[name]["step_ms"]),
            "forward_ms": statistics.median([t for rd in rounds for t in rd[name]["forward_ms"]]),
            "read_bytes_per_token": nbytes,
            "floor_ms": nbytes / (bw * 1e9) * 1e3,
            "x_floor": statistics.median(m / f for m, f in zip(per_round, floors)),
            "x_floor_multi_stream": (statistics.median(m / (nbytes / (rd["bandwidth_multi_gbs"] * 1e9) * 1e3)
                                                       for m, rd in zip(per_round, rounds))
                                     if all("bandwidth_multi_gbs" in rd for rd in rounds) else None),
            "speedup_vs_fp32_eager": statistics.median(
                statistics.median(rd["fp32 eager"]["step_ms"]) / statistics.median(rd[name]["step_ms"])
                for rd in rounds),
            **{k: v[k] for k in ("compile_s", "compiled", "fallback_reason", "rss_before_gb", "rss_after_gb")},
        }
    return {"read_bandwidth_gbs": {"median": bw, "per_round": [rd["bandwidth_gbs"] for rd in rounds]},
            "read_bandwidth_multi_stream_gbs": [rd.get("bandwidth_multi_gbs") for rd in rounds],
            "summary": summary, "rounds": rounds}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    data: dict = {"benchmark": "t3_int8", "note": NOTE, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "machine": common.machine_info(), "load_average_before": os.getloadavg(),
                  "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}}
    print(f"T3 int8, {args.threads} threads. {NOTE}.", flush=True)
    cfg = T3Config()
    if "kernels" not in args.skip:
        print(f"kernels: all 210 linears of T3 at batch 2 (one decode step), {args.kernel_rounds} interleaved rounds",
              flush=True)
        data["kernels"] = time_kernels(cfg, 2, args.kernel_rounds, "slow-kernels" in args.skip)
        print(f"  read bandwidth per round: {[round(b, 1) for b in data['kernels']['_bandwidth_gbs_per_round']]}")
        t3_decode.release_memory()

    if not ({"decode", "drift"} <= args.skip):
        fp32 = t3_decode.load_ours(args.ckpt)
        x = t3_decode.prefill_input(fp32, args.ckpt, args.text_len)
        t3_decode.release_memory()
        rss0 = common.rss_gb()
        int8 = quantize_t3(t3_decode.load_ours(args.ckpt), args.format)  # (named int8 below, whatever --format)
        if args.kv_dtype == "bf16" and cpu_kernels.decode_attention_ready():
            int8.kv_dtype = torch.bfloat16  # as the engine
        elif args.kv_dtype == "int8":
            int8.kv_dtype = torch.int8  # kv_cache="int8"
        t3_decode.release_memory()
        data["resident"] = {
            "format": args.format, "int8_linear_bytes": int8_linear_bytes(int8),
            "low_precision_linear_bytes": low_precision_linear_bytes(int8),
            "float_linear_bytes_left": float_linear_bytes(int8),
            "fp32_linear_bytes": float_linear_bytes(fp32), "rss_gb_fp32_only": rss0,
            "kv_dtype": str(int8.kv_dtype or torch.float32),
            "rss_gb_with_int8_model": common.rss_gb(),
        }
        print(f"resident: {args.format} linears {data['resident']['low_precision_linear_bytes'] / 1e9:.3f} GB (float left: "
              f"{data['resident']['float_linear_bytes_left']}); RSS {rss0:.2f} -> "
              f"{data['resident']['rss_gb_with_int8_model']:.2f} GB after loading + quantising the int8 copy",
              flush=True)
        if "drift" not in args.skip:
            if not args.unpacked_drift and cpu_kernels.available():
                pack_t3(int8)  # as the CPU engine runs it (the fused step's layout; run_decode packs it anyway)
            data["resident"]["packed"] = any(getattr(m, "packed", False) for m in int8.modules())
            data["resident"]["int16_activations"] = (data["resident"]["packed"] and args.format == "int8"
                                                     and cpu_kernels.int8_packed_int16_activations())
            tokens = teacher_tokens(args.drift_steps)
            t0 = time.perf_counter()
            ref = teacher_forced_logits(fp32, x, tokens)
            test = teacher_forced_logits(int8, x, tokens)
            d = distribution_drift(ref, test, tokens)
            d["seconds"] = time.perf_counter() - t0
            data["drift"] = d
            parts = [(f"{args.format} weights, {data['resident']['kv_dtype']} KV cache", d)]
            if int8.kv_dtype is not None:  # the KV cache's share alone: fp32 weights over the same cache dtype
                fp32.kv_dtype = int8.kv_dtype
                data["drift_kv_cache_only"] = distribution_drift(ref, teacher_forced_logits(fp32, x, tokens), tokens)
                fp32.kv_dtype = None
                parts.append((f"fp32 weights, {data['resident']['kv_dtype']} KV cache", data["drift_kv_cache_only"]))
            for name, r in parts:
                print(f"drift over {r['steps']} teacher-forced steps ({name}): TV mean {r['tv_mean']:.4f} max "
                      f"{r['tv_max']:.4f}; KL mean {r['kl_mean']:.5f} max {r['kl_max']:.5f}; top-1 agreement "
                      f"{r['top1_agreement']:.3f}", flush=True)
        if "decode" not in args.skip:
            dec = run_decode(args, fp32, int8, x)
            data["decode"] = dec
            print(f"\nT3 decode, batch 2 (CFG), {args.threads} threads, read bandwidth "
                  f"{dec['read_bandwidth_gbs']['median']:.1f} GB/s. {NOTE}.")
            print(f"{'impl':<16}{'ms/token':>10}{'min':>8}{'GB read':>9}{'floor ms':>10}{'x floor':>9}"
                  f"{'x multi':>9}{'vs fp32':>9}{'compile':>9}")
            for name, r in dec["summary"].items():
                cs = f"{r['compile_s']:.0f}s" if r["compile_s"] is not None else "-"
                print(f"{name:<16}{r['ms_per_token']:>10.1f}{r['ms_per_token_min']:>8.1f}"
                      f"{r['read_bytes_per_token'] / 1e9:>9.3f}{r['floor_ms']:>10.1f}{r['x_floor']:>9.2f}"
                      f"{r['x_floor_multi_stream'] or float('nan'):>9.2f}"
                      f"{r['speedup_vs_fp32_eager']:>8.2f}x{cs:>9}")
    data["load_average_after"] = os.getloadavg()
    common.write_json(args.out, data)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
