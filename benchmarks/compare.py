"""Reference vs chatterbox-fast, end to end, in one run (the guide's `benchmark_comparison.py`).

For each case (short ~5 s, medium ~10 s, long ~15 s of audio) both implementations synthesise the same text with the
same checkpoint; each writes its wav (`reference_<case>.wav`, `ours_<mode>_<case>.wav`) and a stage breakdown:
conditioning (a fresh voice from a clip), T3 prefill, T3 decode (and ms/token), flow, HiFT, watermark, RTF, peak
memory. Speed-up ratios (reference / ours) per stage and end to end go into the JSON.

RANDOM WEIGHTS (the test checkpoint): the audio is noise, not speech. The stop and start tokens are masked in both
implementations so that every case runs exactly its number of decode steps (random weights would otherwise stop at a
random point); about 20% of the sampled ids are >= 6561 and dropped by both, so audio lengths differ slightly.

The reference runs in its own python (`--ref-python`, default the oracle venv) as a subprocess, before ours; ours
runs in this process, one engine per mode. `--rounds N` repeats (reference, our modes) N times, alternating, so
that both sides see a shared VM's slow and fast spells (its speed moves +-15-25 % within minutes); each case's best
run counts. Modes:
  eager       fp32, no CUDA graphs, no compilation (on CPU: the plain engine; since session 9 its T3 decodes
              through the fused C++ step, generation/fused.py, where our kernels build)
  compiled    fp32 + enable_compilation (CUDA: inductor kernels inside CUDA graphs; CPU: the same as eager for
              T3 since session 9 (the fused step needs no compilation; before: an inductor decode step))
  graphs      fp32 + CUDA graphs of the eager kernels (CUDA only)
  bf16        use_mixed_precision (bf16 T3 and estimator) + CUDA graphs (CUDA only)
  bf16-compiled  bf16 + compilation + CUDA graphs; on CPU: use_mixed_precision = bf16 T3 weights, fp32 math
                 (changes the numbers slightly, opt-in)
  int8-compiled  compiled + quantize="int8" (weight-only int8 T3 linears; changes the numbers, opt-in)
  int8-compiled-cfm5  int8-compiled + cfm_steps=5 (half the flow's Euler steps; changes the numbers, opt-in)
  int8-compiled-flowint8  int8-compiled + s3gen_quantize="int8" (int8 GEMMs in the flow estimator, CPU only;
                 changes the numbers, opt-in)
  int8-compiled-flowint8attn  the same with s3gen_quantize="int8-attn" (also int8 attention in the
                 estimator; AVX512-VNNI CPUs; changes the numbers, opt-in)
  int8-compiled-flowint8attn-kv8  the same with kv_cache="int8" (T3's KV cache in int8, CPU only; opt-in)
  eager-spec  eager + speculative="int8" (CPU: an int8 draft proposes, fp32 T3 verifies several tokens per pass;
              exact: the same tokens and audio as eager-plain, bit for bit). Since session 12 the engine's default
              (speculative="auto") does this on the CPU wherever it applies, so on a CPU eager = eager-spec.
  eager-plain eager with speculative=None: the plain decode loop (what eager meant up to session 11)
usage: python benchmarks/compare.py --ckpt-dir DIR [--device cuda] [--modes eager,bf16] [--cases short,medium,long]
       [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

TEXTS = {
    "short": ("short", "Hello there, this is a short test of the speech engine.", 155),
    "medium": ("medium", "The quick brown fox jumps over the lazy dog, while a careful narrator reads the next "
               "paragraph aloud, slowly and clearly, for everyone listening.", 315),
    "long": ("long", "Long-form narration needs a steady voice: the engine reads chapter after chapter, sentence "
             "after sentence, keeping its pace even, its pauses natural, and its tone warm, so that a listener can "
             "follow the story for hours without getting tired.", 470),
}
MODES = {  # name -> (enable_compilation, use_mixed_precision, cuda_graphs, quantize, cfm_steps, s3gen_quantize)
    "eager": (False, False, False, None, None, None),
    "compiled": (True, False, True, None, None, None),
    "graphs": (False, False, True, None, None, None),
    "bf16": (False, True, True, None, None, None),
    "bf16-compiled": (True, True, True, None, None, None),
    "int8-compiled": (True, False, True, "int8", None, None),
    "int8-compiled-cfm5": (True, False, True, "int8", 5, None),
    "int8-compiled-flowint8": (True, False, True, "int8", None, "int8"),
    "int8-compiled-flowint8attn": (True, False, True, "int8", None, "int8-attn"),
    "int8-compiled-flowint8attn-kv8": (True, False, True, "int8", None, "int8-attn"),
    "int8-flowbf16": (False, False, False, "int8", None, "bf16"),  # CPUs with AMX: the flow estimator in bf16
    "bf16-plain": (True, True, True, None, None, None),  # bf16-compiled without speculative decoding (CPU)
    "eager-spec": (False, False, False, None, None, None),
    "eager-plain": (False, False, False, None, None, None),
}
KV_CACHE = {"int8-compiled-flowint8attn-kv8": "int8"}  # modes with a kv_cache option (default otherwise)
# modes with a speculative option (else the default)
SPECULATIVE = {"eager-spec": "int8", "eager-plain": None, "bf16-plain": None}
STOP_SPEECH, START_SPEECH = 6562, 6561
DEFAULT_REF_PYTHON = Path(os.environ.get("CHATTERBOX_FAST_ORACLE_DIR",
                                         Path.home() / ".cache/chatterbox-fast/oracle")) / "venv/bin/python"


def log(*a) -> None:
    print(*a, flush=True, file=sys.stderr)


def mask_stop_and_start(decode_module):
    """Benchmark-only: the stop/start ids can never be drawn (fixed number of decode steps on random weights)."""
    orig = decode_module.process_logits

    def process_logits(logits, seen, p):
        x = orig(logits, seen, p)
        x[..., STOP_SPEECH] = float("-inf")
        x[..., START_SPEECH] = float("-inf")
        return x

    decode_module.process_logits = process_logits
    return orig


def run_ours(a, cases, mode: str) -> dict:
    from chatterbox_fast import OptimizedChatterboxTTS
    from chatterbox_fast.generation import decode

    compiled, bf16, graphs, quantize, cfm_steps, s3gen_quantize = MODES[mode]
    cuda = a.device.startswith("cuda")
    if not cuda and (graphs and not compiled or bf16 and not compiled):
        return {"skipped": f"mode {mode} is CUDA-only"}
    if cuda and s3gen_quantize is not None:
        return {"skipped": f"mode {mode} is CPU-only"}
    kv_cache = KV_CACHE.get(mode)
    speculative = SPECULATIVE.get(mode, "auto")
    if cuda and (kv_cache == "int8" or speculative == "int8"):
        return {"skipped": f"mode {mode} is CPU-only"}
    res = {"impl": "ours", "mode": mode, "quantize": quantize, "cfm_steps": cfm_steps or 10,
           "s3gen_quantize": s3gen_quantize, "kv_cache": kv_cache, "speculative": speculative, "cases": {}}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = OptimizedChatterboxTTS.from_local(a.ckpt_dir, device=a.device, enable_compilation=compiled,
                                                use_mixed_precision=bf16, enable_watermark=a.watermark,
                                                cuda_graphs=graphs, quantize=quantize,
                                                **({"s3gen_quantize": s3gen_quantize} if s3gen_quantize else {}),
                                                **({"kv_cache": kv_cache} if kv_cache else {}),
                                                **({"speculative": speculative} if mode in SPECULATIVE else {}))
    res["load_s"] = time.perf_counter() - t0
    res["speculative"] = "int8" if getattr(eng, "_speculative", None) is not None else None  # what "auto" chose
    if cuda:
        res["gpu_after_load_gb"] = torch.cuda.memory_allocated() / 1e9
    timer = common.StageTimer(cuda)
    orig_prefill, orig_gen_tokens = decode.prefill, eng.generate_tokens
    decode.prefill = timer.wrap("t3_prefill", orig_prefill)
    eng.generate_tokens = timer.wrap("t3", orig_gen_tokens)
    flow, hift = eng.s3gen.flow, eng.s3gen.mel2wav
    flow.inference = timer.wrap("flow", flow.inference)
    hift.forward = timer.wrap("hift", hift.forward)
    eng._finish = timer.wrap("finish", eng._finish)
    try:
        if a.voice is not None:
            builtin = eng.conds
            for _ in range(a.warmup + 1):
                timer.sync()
                t = time.perf_counter()
                eng.prepare_conditionals(str(a.voice), exaggeration=0.5)
                timer.sync()
                res["conditioning_ms"] = (time.perf_counter() - t) * 1e3
            eng.set_voice(builtin)
        for name, text, steps in cases:
            runs = []
            for r in range(a.warmup + a.runs):
                timer.ms = {}
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                timer.sync()
                t = time.perf_counter()
                wav = eng.generate(text, max_new_tokens=steps, seed=a.seed + r, cfm_steps=cfm_steps)
                timer.sync()
                total = (time.perf_counter() - t) * 1e3
                log(f"  ours/{mode} {name} run {r}: {total:.0f} ms, {wav.shape[-1] / eng.sr:.2f} s audio")
                if r < a.warmup:
                    continue
                ms = timer.ms
                stages = {"t3_prefill_ms": ms.get("t3_prefill", 0.0),
                          "t3_decode_ms": ms.get("t3", 0.0) - ms.get("t3_prefill", 0.0),
                          "flow_ms": ms.get("flow", 0.0), "hift_ms": ms.get("hift", 0.0),
                          "watermark_ms": ms.get("finish", 0.0)}
                stages["other_ms"] = total - sum(stages.values())
                n = wav.shape[-1]
                run = {"total_ms": total, "stages": stages, "decode_steps": steps - 1, "samples": n,
                       "audio_s": n / eng.sr}
                if getattr(eng, "_speculative", None) is not None:
                    run["speculative"] = dict(eng._speculative.last_stats)  # rounds / drafted / accepted / tokens
                if cuda:
                    run["gpu_peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1e9
                runs.append(run)
                if a.wav_dir is not None and r == a.warmup:
                    import soundfile as sf

                    a.wav_dir.mkdir(parents=True, exist_ok=True)
                    sf.write(str(a.wav_dir / f"ours_{mode}_{name}.wav"), wav.squeeze(0).numpy(), eng.sr)
            res["cases"][name] = runs
        if a.profile_dir is not None and mode in a.profile_modes.split(","):
            res["profile"] = profile_one(a, eng, cases[0], mode)
    finally:
        decode.prefill = orig_prefill
    return res


def profile_one(a, eng, case, mode: str) -> str:
    """One more request under torch.profiler: the top ops by device and by host time, to a text file."""
    from torch.profiler import ProfilerActivity, profile

    name, text, steps = case
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        eng.generate(text, max_new_tokens=steps, seed=a.seed)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
    ka = prof.key_averages()
    by_dev = "cuda_time_total" if a.device.startswith("cuda") else "cpu_time_total"
    path = a.profile_dir / f"profile_{mode}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"RANDOM WEIGHTS. one request: case {name}, {steps} steps, mode {mode}\n\n"
                    + ka.table(sort_by=by_dev, row_limit=30, max_name_column_width=60) + "\n\n"
                    + ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    return str(path)


def run_reference(a, cases) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cases_json = Path(tmp) / "cases.json"
        cases_json.write_text(json.dumps([{"name": n, "text": t, "steps": s} for n, t, s in cases]))
        cmd = [str(a.ref_python), str(Path(__file__).parent / "_reference_e2e.py"), "--ckpt", str(a.ckpt_dir),
               "--cases", str(cases_json), "--device", a.device, "--runs", str(a.ref_runs or a.runs),
               "--warmup", str(a.warmup),
               "--threads", str(a.threads), "--seed", str(a.seed)]
        if a.voice is not None:
            cmd += ["--voice", str(a.voice)]
        if a.wav_dir is not None:
            cmd += ["--wav-dir", str(a.wav_dir)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.ref_timeout)
    if p.returncode != 0:
        return {"error": f"reference exited {p.returncode}", "stderr_tail": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def merge_runs(acc: dict | None, res: dict) -> dict:
    """Fold one round's result into the accumulated one: the runs of each case are appended, the rest (load time,
    errors) is kept from the first round."""
    if acc is None or "cases" not in acc:
        return res
    for name, runs in res.get("cases", {}).items():
        acc["cases"].setdefault(name, []).extend(runs)
    return acc


def summarise(res: dict) -> dict:
    """Median-free summary: the best (min total) run of each case, with ms/token and RTF."""
    out = {}
    for name, runs in res.get("cases", {}).items():
        if not runs:
            continue
        best = min(runs, key=lambda r: r["total_ms"])
        s = dict(best["stages"])
        steps = max(best["decode_steps"], 1)
        out[name] = {"total_ms": best["total_ms"], "audio_s": best["audio_s"],
                     "rtf": best["total_ms"] / 1e3 / max(best["audio_s"], 1e-9),
                     "t3_ms_per_token": s["t3_decode_ms"] / steps, **s}
        if "gpu_peak_alloc_gb" in best:
            out[name]["gpu_peak_alloc_gb"] = best["gpu_peak_alloc_gb"]
    return out


def ratios(ref: dict, ours: dict) -> dict:
    keys = ("total_ms", "t3_prefill_ms", "t3_ms_per_token", "flow_ms", "hift_ms", "rtf")
    out = {}
    for case, r in ref.items():
        o = ours.get(case)
        if o:
            out[case] = {k: r[k] / o[k] for k in keys if o.get(k) and r.get(k)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default=None, help="comma list of " + ",".join(MODES) +
                    " (default: eager,compiled on CPU; eager,graphs,bf16,bf16-compiled on CUDA)")
    ap.add_argument("--cases", default="short,medium,long")
    ap.add_argument("--max-steps", type=int, default=0, help="cap every case's decode steps (quick runs)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat (reference, ours modes) this many times, alternating; the best run of each counts")
    ap.add_argument("--ref-runs", type=int, default=0, help="timed reference runs (default: --runs)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voice", type=Path, help="clip to time the conditioning stage with")
    ap.add_argument("--watermark", action="store_true", help="watermark our output too (needs the extra)")
    ap.add_argument("--ref-python", type=Path, default=DEFAULT_REF_PYTHON)
    ap.add_argument("--ref-timeout", type=float, default=3600)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--wav-dir", type=Path)
    ap.add_argument("--profile-dir", type=Path, help="profile one extra request per mode in --profile-modes")
    ap.add_argument("--profile-modes", default="bf16-compiled")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    modes = (a.modes or ("eager,graphs,bf16,bf16-compiled" if cuda else "eager,compiled")).split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    cases = [TEXTS[c] for c in a.cases.split(",")]
    if a.max_steps > 0:
        cases = [(n, t, min(s, a.max_steps)) for n, t, s in cases]
    out = {"benchmark": "compare", "random_weights": True,
           "note": "RANDOM WEIGHTS: audio is noise, not speech; stop/start ids masked so each case runs its steps",
           "machine": common.machine_info(), "args": {k: str(v) for k, v in vars(a).items()},
           "cases": {n: {"text": t, "decode_steps": s} for n, t, s in cases}}
    out_path = a.out or Path(__file__).parent / "results" / f"compare-{a.device.split(':')[0]}-{int(time.time())}.json"

    def save():
        common.write_json(out_path, out)

    from chatterbox_fast.generation import decode
    out["ours"] = {}
    for rnd in range(a.rounds):  # reference and ours alternate: both see this VM's slow and fast spells
        if not a.no_reference:
            log(f"round {rnd}: reference ...")
            t = time.perf_counter()
            try:
                ref = run_reference(a, cases)
            except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
                ref = {"error": f"{type(e).__name__}: {e}"}
            out["reference"] = merge_runs(out.get("reference"), ref)
            log(f"reference done in {time.perf_counter() - t:.0f} s: {str(ref)[:300]}")
            save()
        orig = mask_stop_and_start(decode)
        try:
            for m in modes:
                log(f"round {rnd}: ours/{m} ...")
                try:
                    res = run_ours(a, cases, m)
                except Exception as e:  # noqa: BLE001
                    res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                    log(res["traceback"])
                out["ours"][m] = merge_runs(out["ours"].get(m), res)
                if cuda:
                    torch.cuda.empty_cache()
                save()
        finally:
            decode.process_logits = orig
    ref_sum = summarise(out.get("reference", {}))
    out["summary"] = {"reference": ref_sum}
    out["speedup"] = {}
    for m, r in out["ours"].items():
        out["summary"][m] = summarise(r)
        out["speedup"][m] = ratios(ref_sum, out["summary"][m])
    save()
    where = out["machine"].get("gpu") or out["machine"].get("cpu_model")
    print(f"RANDOM WEIGHTS (noise, not speech). {a.device}: {where}")
    print(f"{'impl':<16}{'case':<8}{'total ms':>10}{'audio s':>9}{'RTF':>8}{'T3 ms/tok':>10}{'prefill':>9}"
          f"{'flow':>8}{'hift':>8}{'x ref':>7}")
    for impl, summ in out["summary"].items():
        for case, s in summ.items():
            sp = out["speedup"].get(impl, {}).get(case, {}).get("total_ms")
            print(f"{impl:<16}{case:<8}{s['total_ms']:>10.0f}{s['audio_s']:>9.2f}{s['rtf']:>8.3f}"
                  f"{s['t3_ms_per_token']:>10.2f}{s['t3_prefill_ms']:>9.0f}{s['flow_ms']:>8.0f}{s['hift_ms']:>8.0f}"
                  f"{'' if sp is None else f'{sp:.1f}x':>7}")
    print(f"json: {out_path}")


if __name__ == "__main__":
    main()
