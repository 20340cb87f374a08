"""S3Gen speed (flow: speech tokens + prompt -> mel; HiFT: mel -> wav): the reference vs ours, same weights, same run.

    .venv/bin/python benchmarks/s3gen.py [--tokens 125] [--device cpu|cuda] [--threads N] [--iters 3] [--rounds 1]
        [--int8] [--int8-attn] [--bf16] [--out PATH]

WEIGHTS ARE RANDOM (the oracle's checkpoint, official shapes) and the prompt is synthetic: 250 prompt tokens and
500 prompt frames (a 10 s prompt) + 125 generated tokens (5 s) -> T = 750 mel frames, 10 Euler steps of the CFM
estimator on a CFG batch of 2. Speed does not depend on the values.

Reported: flow wall time (min / median over --iters after --warmup), time per estimator call, HiFT wall time on the
flow's mel and flow + HiFT, the flow's FLOPs (counted on our implementation: every GEMM / conv via torch's
FlopCounterMode, plus 4*B*H*Tq*Tk*D per attention call, SDPA or our CPU kernel), the achieved GFLOP/s of both
implementations against the measured fp32 GEMM throughput of the machine (benchmarks/common.py), the estimator
alone (FLOPs of one call / median call time; the issue's >= 85 % target is on this one) against the best probe of
the run and, per call, against a small GEMM probe taken right after that call (`AdjacentProbe`: the same machine
state), and the speed-up ratio.
- reference: benchmarks/_reference_s3gen.py in the oracle venv (subprocess, JSON on stdout).
- --int8 (CPU): each round also measures ours with s3gen_quantize="int8" (the opt-in int8 estimator GEMMs), and the
  run ends with that mode's drift from the exact output (mel and waveform, same noise).
- --int8-attn (CPU with AVX512-VNNI): the same for s3gen_quantize="int8-attn" (int8 GEMMs + int8 attention).
- --bf16 (CPU; fast where it has AMX / AVX512-BF16): the same for s3gen_quantize="bf16" (bf16 GEMMs + attention).
- ours: in process, `S3Gen.flow.inference` then `S3Gen.mel2wav` eager, with the engine's estimator weight layout, with our CPU kernels loaded on a CPU (as the
  engine does; CHATTERBOX_FAST_CPU_KERNELS=0 measures the pure-PyTorch path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import common  # noqa: E402
import oracle_paths  # noqa: E402
from _reference_s3gen import prompt_inputs  # noqa: E402
from chatterbox_fast import kernels  # noqa: E402
from chatterbox_fast.models.s3gen import S3Gen  # noqa: E402
from chatterbox_fast.models.s3gen.estimator import BasicTransformerBlock  # noqa: E402
from chatterbox_fast.quantize import quantize_s3gen  # noqa: E402
from chatterbox_fast.weights import read_safetensors  # noqa: E402

NOTE = "weights are random (oracle checkpoint, official shapes) and the prompt is synthetic: speed is unaffected"


def _addmm_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """2*m*k*n for addmm_(self (m, n), a (m, k), b (k, n))."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _full_attention_flop(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """4*B*H*Tq*Tk*D for our CPU kernel chatterbox_fast::full_attention(q, k, v (B, T, H, D))."""
    b, tq, h, d = q_shape
    return 2 * b * h * tq * k_shape[1] * (d + v_shape[-1])


def count_flops(fn) -> int:
    """FLOPs of fn(): GEMMs/convs (addmm_ included) from FlopCounterMode (its SDPA entries dropped) + 4*B*H*Tq*Tk*D
    per SDPA call or call of our CPU attention kernel."""
    attn = [0]
    orig = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        b, h, tq, d = q.shape
        attn[0] += 2 * b * h * tq * k.shape[-2] * (d + v.shape[-1])
        return orig(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        # FlopCounterMode knows aten.addmm but not the in-place addmm_ (our fused residual GEMMs, shifted convs).
        mapping = {torch.ops.aten.addmm_: _addmm_flop}
        if kernels.available():
            mapping[torch.ops.chatterbox_fast.full_attention] = _full_attention_flop
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            fn()
    finally:
        F.scaled_dot_product_attention = orig
    counts = fc.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if "scaled_dot_product" not in str(op)) + attn[0])


def setup_ours(a, ckpt: Path):
    """Load ours and count FLOPs -> (info dict, measure()); measure() runs --warmup + --iters flow + HiFT calls and
    returns the raw times (ms) of the timed ones."""
    sync = a.device.startswith("cuda")
    if a.device == "cpu":
        kernels.load()
    t0 = time.perf_counter()
    s3gen = S3Gen.from_state(read_safetensors(ckpt / "s3gen.safetensors")).to(a.device)
    s3gen.init_buffers()
    s3gen.flow.decoder.estimator.inference_layout_()  # as the engine runs it (same values)
    flow, hift = s3gen.flow, s3gen.mel2wav
    load_s = time.perf_counter() - t0
    x = {k: v.to(a.device) for k, v in prompt_inputs(a.tokens, a.prompt_tokens, a.prompt_frames).items()}
    gen = torch.Generator(device=a.device).manual_seed(0)

    def call():
        return flow.inference(x["speech_tokens"], x["prompt_token"], x["prompt_feat"], x["embedding"], generator=gen)

    flops = count_flops(call)
    est = flow.decoder.estimator
    t = 2 * (a.tokens + a.prompt_tokens)
    h = torch.zeros(2, t, 4 * flow.cfg.n_feats, device=a.device)
    t_emb = est.embed_time(torch.zeros(2, device=a.device))
    est_flops = count_flops(lambda: est.forward_packed(h, t_emb))  # one estimator call (CFG batch of 2)
    info = {"load_s": load_s, "kernels": kernels.isa() if kernels.available() else None, "flops": flops,
            "estimator_call_flops": est_flops}
    blocks = [m for m in est.modules() if isinstance(m, BasicTransformerBlock)]
    int8_linears, bf16_linears = [None] * len(blocks), [None] * len(blocks)
    if a.int8 or a.int8_attn:
        quantize_s3gen(s3gen, "int8-attn" if a.int8_attn else "int8")
        int8_linears = [b.int8 for b in blocks]
    if a.bf16:
        quantize_s3gen(s3gen, "bf16")
        bf16_linears = [b.bf16 for b in blocks]

    def use_int8(mode: str | None) -> None:
        """None (exact), "int8" (int8 GEMMs), "int8-attn" (also int8 attention) or "bf16" (bf16 GEMMs and
        attention)."""
        for b, q, h in zip(blocks, int8_linears, bf16_linears):
            b.int8 = q if mode in ("int8", "int8-attn") else None
            b.int8_attention = mode == "int8-attn"
            b.bf16 = h if mode == "bf16" else None

    use_int8(None)

    probe = AdjacentProbe(a.device) if a.adjacent_probe else None

    def measure() -> dict:
        orig = est.forward_packed
        est_ms: list[float] = []
        adjacent: list[float] = []  # GEMM probe GFLOP/s right after each estimator call
        probe_ms = [0.0]  # time spent in those probes, taken out of the flow's time

        def timed(*args, **kwargs):
            common._sync(sync)
            t = time.perf_counter()
            out = orig(*args, **kwargs)
            common._sync(sync)
            t1 = time.perf_counter()
            est_ms.append((t1 - t) * 1e3)
            if probe is not None:
                adjacent.append(probe())
                probe_ms[0] += (time.perf_counter() - t1) * 1e3
            return out

        est.forward_packed = timed
        flow_ms, hift_ms = [], []
        try:
            for i in range(a.warmup + a.iters):
                common._sync(sync)
                probe_ms[0] = 0.0
                t = time.perf_counter()
                mel = call()
                common._sync(sync)
                t1 = time.perf_counter()
                wav, _ = hift(mel, generator=gen)
                common._sync(sync)
                if i >= a.warmup:
                    flow_ms.append((t1 - t) * 1e3 - probe_ms[0])
                    hift_ms.append((time.perf_counter() - t1) * 1e3)
        finally:
            del est.forward_packed
        return {"flow": flow_ms, "hift": hift_ms, "est": est_ms[-10 * a.iters:], "adj": adjacent[-10 * a.iters:],
                "mel_shape": list(mel.shape), "wav_samples": wav.shape[-1]}

    def drift(mode: str) -> dict:
        """A low-precision mode's output against the exact one: same inputs, same CFM noise and HiFT randomness."""
        outs = []
        for on in (None, mode):
            use_int8(on)
            mel = flow.inference(x["speech_tokens"], x["prompt_token"], x["prompt_feat"], x["embedding"],
                                 generator=torch.Generator(device=a.device).manual_seed(0))
            wav, _ = hift(mel, generator=torch.Generator(device=a.device).manual_seed(1))
            outs.append((mel.float().cpu(), wav.float().cpu()))
        use_int8(None)
        (m0, w0), (m1, w1) = outs

        def rel(u, v):
            return ((u - v).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()).item()
        return {"mel_rel_rms": rel(m1, m0), "mel_max_abs": (m1 - m0).abs().max().item(),
                "mel_rms": m0.pow(2).mean().sqrt().item(), "wav_rel_rms": rel(w1, w0)}

    return info, measure, use_int8, drift


class AdjacentProbe:
    """One small fp32 GEMM, (1024, 2048) @ (2048, 1024), best of 2: the machine's GEMM throughput right after an
    estimator call. This VM's speed swings by 1.5-2x within minutes, so a probe taken minutes away from a call can be
    from another spell; the per-call ratio to the adjacent probe is the steadier efficiency figure."""

    def __init__(self, device: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(1024, 2048, generator=g).to(device)
        self.b = torch.randn(2048, 1024, generator=g).to(device)
        self.out = torch.empty(1024, 1024, device=device)
        self.sync = device.startswith("cuda")

    def __call__(self) -> float:
        best = float("inf")
        for _ in range(2):
            common._sync(self.sync)
            t = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            common._sync(self.sync)
            best = min(best, time.perf_counter() - t)
        return 2.0 * 1024 * 2048 * 1024 / best / 1e9


def _adjacent_fraction(est_gflop: float, est_ms: list[float], adj: list[float]) -> dict | None:
    """Per estimator call: (its GFLOP/s) / (the GEMM probe right after it); median, min and max over the calls."""
    if not adj:
        return None
    f = [est_gflop / (ms * 1e-3) / g for ms, g in zip(est_ms, adj)]
    return {"median": statistics.median(f), "min": min(f), "max": max(f), "calls": len(f),
            "probe_gflops_median": statistics.median(adj)}


def _stats(ms: list[float]) -> dict:
    return {"min_ms": min(ms), "median_ms": statistics.median(ms), "iters": len(ms)}


def run_reference(a, ckpt: Path) -> dict:
    cmd = [
        str(oracle_paths.venv_python()), str(HERE / "_reference_s3gen.py"), "--ckpt", str(ckpt),
        "--tokens", str(a.tokens), "--prompt-tokens", str(a.prompt_tokens), "--prompt-frames", str(a.prompt_frames),
        "--warmup", str(a.warmup), "--iters", str(a.iters), "--threads", str(torch.get_num_threads()),
        "--device", a.device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"reference benchmark failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=125)
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--prompt-frames", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate ours and the reference this many times (each: --warmup + --iters calls)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-adjacent-probe", dest="adjacent_probe", action="store_false",
                    help="skip the small GEMM probe after each of our estimator calls (its time is not counted in "
                         "the flow's)")
    ap.add_argument("--int8", action="store_true", help="also measure s3gen_quantize='int8' (int8 estimator GEMMs, "
                    "CPU) in every round, and its drift from the exact output")
    ap.add_argument("--int8-attn", action="store_true", help="also measure s3gen_quantize='int8-attn' (int8 GEMMs "
                    "and int8 attention, AVX512-VNNI CPUs) in every round, and its drift")
    ap.add_argument("--bf16", action="store_true", help="also measure s3gen_quantize='bf16' (bf16 GEMMs and "
                    "attention; fast on CPUs with AMX) in every round, and its drift")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds for the reference subprocess")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    ckpt = oracle_paths.ckpt_dir()
    if not oracle_paths.is_built(ckpt):
        sys.exit(f"oracle checkpoint missing: {ckpt} (run `make oracle`)")

    if (a.int8 or a.int8_attn or a.bf16) and a.device != "cpu":
        sys.exit("--int8 / --int8-attn / --bf16 are CPU modes")
    info, measure, use_int8, drift = setup_ours(a, ckpt)
    raw = {k: {"flow": [], "hift": [], "est": [], "adj": []} for k in ("ours", "reference", "ours_int8",
                                                                        "ours_int8_attn", "ours_bf16")}
    int8_modes = [m for m, on in (("int8", a.int8), ("int8-attn", a.int8_attn), ("bf16", a.bf16)) if on]
    gemm_probes, ref, shapes = [], None, {}
    for _ in range(a.rounds):  # ours and the reference alternate: both see the machine's slow and fast spells
        gemm_probes.append(common.measure_gemm_gflops(device=a.device))
        m = measure()
        shapes = {"mel_shape": m["mel_shape"], "wav_samples": m["wav_samples"]}
        for k in ("flow", "hift", "est", "adj"):
            raw["ours"][k] += m[k]
        for mode in int8_modes:
            use_int8(mode)
            m = measure()
            use_int8(None)
            for k in ("flow", "hift", "est", "adj"):
                raw["ours_" + mode.replace("-", "_")][k] += m[k]
        if not a.no_reference:
            ref = run_reference(a, ckpt)
            for k, rk in (("flow", "flow_all_ms"), ("hift", "hift_all_ms"), ("est", "estimator_all_ms")):
                raw["reference"][k] += ref.pop(rk)
    gemm_probes.append(common.measure_gemm_gflops(device=a.device))
    gemm = max(gemm_probes)  # the least disturbed probe: ratios against it are conservative
    ours = {**info, **shapes, "flow_ms": _stats(raw["ours"]["flow"]), "hift_ms": _stats(raw["ours"]["hift"]),
            "estimator_call_ms": _stats(raw["ours"]["est"]), "raw_ms": raw["ours"]}
    if ref is not None:
        ref.update(flow_ms=_stats(raw["reference"]["flow"]), hift_ms=_stats(raw["reference"]["hift"]),
                   estimator_call_ms=_stats(raw["reference"]["est"]), raw_ms=raw["reference"])
    flops = ours["flops"]
    result = {
        "note": NOTE,
        "machine": common.machine_info(),
        "device": a.device,
        "shape": {"tokens": a.tokens, "prompt_tokens": a.prompt_tokens, "prompt_frames": a.prompt_frames,
                  "mel_frames_total": 2 * (a.tokens + a.prompt_tokens), "n_timesteps": 10, "cfg_batch": 2},
        "gemm_fp32_gflops": gemm,
        "gemm_fp32_gflops_probes": gemm_probes,
        "rounds": a.rounds,
        "flow_gflop": flops / 1e9,
        "ours": {**ours, "achieved_gflops": flops / (ours["flow_ms"]["min_ms"] * 1e-3) / 1e9},
    }
    result["ours"]["fraction_of_gemm"] = result["ours"]["achieved_gflops"] / gemm
    # The target: the estimator alone (its FLOPs per call / its median call time) against the GEMM peak.
    est_gflop = ours["estimator_call_flops"] / 1e9
    result["estimator_call_gflop"] = est_gflop
    result["ours"]["estimator_gflops"] = est_gflop / (ours["estimator_call_ms"]["median_ms"] * 1e-3)
    result["ours"]["estimator_fraction_of_gemm"] = result["ours"]["estimator_gflops"] / gemm
    result["ours"]["estimator_fraction_of_adjacent_gemm"] = _adjacent_fraction(est_gflop, raw["ours"]["est"],
                                                                               raw["ours"]["adj"])
    if ref is not None:
        ref["achieved_gflops"] = flops / (ref["flow_ms"]["min_ms"] * 1e-3) / 1e9
        ref["fraction_of_gemm"] = ref["achieved_gflops"] / gemm
        ref["estimator_gflops"] = est_gflop / (ref["estimator_call_ms"]["median_ms"] * 1e-3)
        ref["estimator_fraction_of_gemm"] = ref["estimator_gflops"] / gemm
        result["reference"] = ref
        result["speedup_flow_min"] = ref["flow_ms"]["min_ms"] / ours["flow_ms"]["min_ms"]
        result["speedup_hift_min"] = ref["hift_ms"]["min_ms"] / ours["hift_ms"]["min_ms"]
        ref_total = ref["flow_ms"]["min_ms"] + ref["hift_ms"]["min_ms"]
        result["speedup_flow_plus_hift_min"] = ref_total / (ours["flow_ms"]["min_ms"] + ours["hift_ms"]["min_ms"])
        result["speedup_estimator_median"] = (
            ref["estimator_call_ms"]["median_ms"] / ours["estimator_call_ms"]["median_ms"]
        )
    notes = {"int8": "s3gen_quantize='int8': int8 GEMMs for the estimator's transformer linears; changes the output",
             "int8-attn": "s3gen_quantize='int8-attn': int8 GEMMs and int8 attention (Q K^T and P V); changes "
                          "the output",
             "bf16": "s3gen_quantize='bf16': bf16 GEMMs for the estimator's transformer linears and attention on "
                     "bf16 q/k/v (fp32 residual stream, norms, convolutions); changes the output"}
    for mode in int8_modes:
        key = "ours_" + mode.replace("-", "_")
        o8 = {"flow_ms": _stats(raw[key]["flow"]), "hift_ms": _stats(raw[key]["hift"]),
              "estimator_call_ms": _stats(raw[key]["est"]), "raw_ms": raw[key],
              "drift_vs_exact": drift(mode), "note": notes[mode]}
        o8["estimator_speedup_vs_exact_median"] = (ours["estimator_call_ms"]["median_ms"]
                                                   / o8["estimator_call_ms"]["median_ms"])
        o8["flow_speedup_vs_exact_min"] = ours["flow_ms"]["min_ms"] / o8["flow_ms"]["min_ms"]
        if ref is not None:
            o8["speedup_flow_plus_hift_min_vs_reference"] = (
                (ref["flow_ms"]["min_ms"] + ref["hift_ms"]["min_ms"])
                / (o8["flow_ms"]["min_ms"] + o8["hift_ms"]["min_ms"]))
        result[key] = o8
    out = a.out or HERE / "results" / f"s3gen-{a.device.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    common.write_json(out, result)
    print(json.dumps(result, indent=2, default=str))
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
