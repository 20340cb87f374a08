"""T3 decode speed: the reference vs ours on the same weights, interleaved in one run, against the bandwidth floor.

    .venv/bin/python benchmarks/t3_decode.py [--steps 64] [--rounds 8] [--threads 2] [--modes eager,compiled]

WEIGHTS ARE RANDOM (the oracle's checkpoint, official shapes): speed does not depend on the values, the tokens are
meaningless. The number of decode steps is fixed (the stop token can never end a run).

Interleaving: the --steps timed steps of every implementation are split into --rounds rounds; in each round the
reference (a subprocess in the oracle venv, benchmarks/_reference_t3.py, paused between chunks), each of our modes
and one read-bandwidth probe (benchmarks/common.py) run one after the other, in a rotating order, at the same decode
positions. On a machine shared with other jobs the load changes by the minute; within a round everyone sees about
the same machine, so the per-round ratios (summarised by their median) are what to read, the absolute ms less so.

Reported per implementation: prefill ms (one call; the same eager prefill for all our modes), decode ms/token
("step": one whole token, processors and draw included, like the reference's loop step; median of all timed steps),
"forward": the model part alone (the reference's backend call; our step_logits / its compiled graph), achieved GB/s
= bytes of T3 linear weights read per token (every nn.Linear of the 30 layers + speech_head, counted from the model)
/ ms per token, x floor = ms per token / (those bytes / the probe's bandwidth), and the speed-up over the reference.
Modes (ours): eager; compiled = compile_decode_step's defaults (inductor default mode, no freezing, dynamic kv_len);
autotune-freezing = max-autotune (C++ micro-GEMM) + freezing; freezing = default mode + freezing; autotune =
max-autotune without freezing; autotune-freezing-static = autotune-freezing with dynamic=None (kv_len specialised
on its first value, then automatic dynamic: one more graph, one more frozen copy of the weights); fused =
generation/fused.py (the 30 layers in one C++ call, no compilation; fuses an fp32 model's q/k/v and gate/up first).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import common  # noqa: E402
import oracle_paths  # noqa: E402
from chatterbox_fast.config import T3Config  # noqa: E402
from chatterbox_fast.generation.compile import CompiledStep  # noqa: E402
from chatterbox_fast.generation.decode import kv_bucket, new_state, prefill, step_logits  # noqa: E402
from chatterbox_fast.generation.fused import FusedDecodeStep  # noqa: E402
from chatterbox_fast.generation.sampling import SamplingParams, exponential_noise  # noqa: E402
from chatterbox_fast.models.t3 import T3, T3_KEYMAP  # noqa: E402
from chatterbox_fast.quantize import pack_t3  # noqa: E402
from chatterbox_fast.weights import load_strict, read_safetensors  # noqa: E402

# mode name -> (torch.compile mode or "eager", freezing, dynamic[, extra inductor options])
MODES = {
    "eager": ("eager", False, True),
    "compiled": ("default", False, True),  # compile_decode_step's defaults
    "autotune-freezing": ("max-autotune-no-cudagraphs", True, True),
    "autotune-freezing-static": ("max-autotune-no-cudagraphs", True, None),
    "freezing": ("default", True, True),
    "autotune": ("max-autotune-no-cudagraphs", False, True),
    # inductor's C++ wrapper instead of its Python one (no per-kernel Python calls; ~2.7x the compile time)
    "compiled-cpp-wrapper": ("default", False, True, {"cpp_wrapper": True}),
    # generation/fused.py: the layer stack as one C++ call, no compilation (fuses q/k/v and gate/up of an fp32 model)
    "fused": ("fused", False, True),
}
PARAMS = SamplingParams(temperature=0.8, cfg_weight=0.5, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
NOTE = ("weights are random (oracle checkpoint, official shapes): speed is unaffected, the tokens are meaningless; "
        "the stop token cannot end a run (fixed step count)")


class CompileTimeout(Exception):
    pass


def text_ids(n: int) -> torch.Tensor:
    """SOT + n deterministic ids + EOT: (1, n + 2). Same ids as benchmarks/_reference_t3.py."""
    return torch.tensor([[255] + [(7 * i) % 600 + 1 for i in range(n)] + [0]])


def linear_weight_bytes(model: T3) -> int:
    """Bytes of every linear weight one decode step reads: all nn.Linear in the layers, plus speech_head."""
    mods = [m for m in model.tfmr.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.speech_head]
    return sum(m.weight.numel() * m.weight.element_size() for m in mods)


def kv_read_bytes(cfg: T3Config, batch: int, n_pos: int, itemsize: int = 4) -> int:
    """Bytes of K and V read by one decode step attending over n_pos positions, all layers."""
    return 2 * cfg.n_layers * batch * cfg.n_heads * cfg.head_dim * n_pos * itemsize


# ---- reference (subprocess in the oracle venv, driven in chunks) ----------------------------------------------
class Reference:
    """benchmarks/_reference_t3.py: "go N" runs N more decode steps of the reference's loop, then it blocks."""

    def __init__(self, args):
        py = oracle_paths.venv_python()
        if not py.is_file():
            raise RuntimeError(f"oracle venv missing: {py}")
        self.log = tempfile.TemporaryFile(mode="w+")  # tqdm and warnings (a pipe could fill up and block it)
        cmd = [str(py), str(HERE / "_reference_t3.py"), "--ckpt", str(args.ckpt), "--text-len", str(args.text_len),
               "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=ROOT)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"reference exited ({self.proc.returncode}): {self.log.read()[-3000:]}")
        return json.loads(line)

    def run(self, n: int) -> dict:
        self.proc.stdin.write(f"go {n}\n")
        self.proc.stdin.flush()
        msg = self._read()
        if "chunk" not in msg:
            raise RuntimeError(f"reference: {msg}")
        return msg["chunk"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


# ---- ours -----------------------------------------------------------------------------------------------------
def load_ours(ckpt: Path) -> T3:
    from chatterbox_fast import kernels

    kernels.load()  # as the engine does on CPU (T3's decode attention runs our kernel once it is loaded)
    with torch.device("meta"):
        model = T3(T3Config())
    load_strict(model, read_safetensors(ckpt / "t3_cfg.safetensors"), T3_KEYMAP, name="t3_cfg.safetensors")
    # own the memory (the reference copies into its parameters too): no page faults on a file mapping
    for p in model.parameters():
        p.data = p.data.clone()
    return model.eval()


def prefill_input(model: T3, ckpt: Path, text_len: int) -> torch.Tensor:
    conds = torch.load(ckpt / "conds.pt", map_location="cpu", weights_only=True)["t3"]
    exg = conds["emotion_adv"].reshape(-1)[:1].float()
    cond = model.cond_embeds(conds["speaker_emb"], conds["cond_prompt_speech_tokens"].long(), exg)
    return model.prefill_embeds(cond, text_ids(text_len), cfg_batch=True)


class FusedAsStep(FusedDecodeStep):
    """FusedDecodeStep with the bits of CompiledStep's interface that Ours uses (never compiled)."""

    is_compiled = False
    fallback_reason = None
    _compiled = None

    def __init__(self, model: T3):
        if model.tfmr.layers[0].self_attn.qkv_proj is None:
            model.fuse_projections()  # an fp32 model: the kernel takes fused q/k/v and gate/up
        pack_t3(model)  # as the engine does (int8 weights in the kernel's packed layout; other modes unpack)
        super().__init__(model)

    def _config(self):
        return contextlib.nullcontext()


class Ours:
    """One of our modes: a CompiledStep (or eager) with its own decode state; every chunk starts at a given
    position, so all modes decode the same positions in a round (they share the model's KV cache: values do not
    matter for timing, positions and kv_len do)."""

    def __init__(self, model: T3, name: str, S: int, args):
        self.model, self.name, self.S = model, name, S
        self.mode, self.freezing, dynamic, *options = MODES[name]
        if self.mode == "fused":
            self.step = FusedAsStep(model)
        else:
            self.step = CompiledStep(model, self.mode, self.freezing, dynamic=dynamic,
                                     options=options[0] if options else None)
        with torch.inference_mode():  # as in generate_tokens (the compiled step guards on it)
            self.state = new_state(model, S, 2, "cpu")
            self.tok = torch.tensor([100])
        self.gen = torch.Generator().manual_seed(0)
        self.compile_s = None

    @torch.inference_mode()
    def compile(self, timeout_s: int) -> None:
        if not self.step.is_compiled:
            return

        def _alarm(*_):
            raise CompileTimeout(f"compile exceeded --compile-timeout {timeout_s} s")

        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout_s)
        t0 = time.perf_counter()
        try:
            self.step.warm_up(2, PARAMS)  # CompileTimeout inside the compiler ends in the eager fall-back
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        self.compile_s = time.perf_counter() - t0
        release_memory()  # compiling (freezing: constant folding, weight packing) leaves GBs of freed heap behind

    @torch.inference_mode()
    def run(self, n: int, pos: int) -> dict:
        """n decode steps feeding positions pos, pos+1, ...: step times, then the model part alone (3 calls)."""
        st, V = self.state, self.model.cfg.speech_vocab_size
        st.input_pos.fill_(pos)
        st.speech_pos.fill_(pos - self.S + 1)
        steps = []
        for i in range(n):
            noise = exponential_noise((1, V), "cpu", self.gen)
            kv_len = kv_bucket(pos + i + 1, self.model.max_seq)
            t0 = time.perf_counter()
            self.tok = self.step(self.model, self.tok, st, noise, PARAMS, kv_len)
            steps.append((time.perf_counter() - t0) * 1e3)
        logits_fn = self.step._compiled if self.step.is_compiled else getattr(self.step, "step_logits", step_logits)
        st.input_pos.fill_(pos + n - 1)
        st.speech_pos.fill_(pos + n - 1 - self.S + 1)
        kv_len = kv_bucket(pos + n, self.model.max_seq)
        fwd = []
        for _ in range(3):
            t0 = time.perf_counter()
            with self.step._config():  # freezing flag as at compile time (else dynamo traces an unfrozen graph)
                logits_fn(self.model, self.tok, st, kv_len)
            fwd.append((time.perf_counter() - t0) * 1e3)
        return {"step_ms": steps, "forward_ms": fwd}


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@torch.inference_mode()
def time_prefill(model: T3, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    prefill(model, x)
    return (time.perf_counter() - t0) * 1e3


# ---- statistics -----------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "n": len(xs)}


def multi_stream_bandwidth(streams: int = 8) -> dict:
    """{"bandwidth_multi_gbs": read bandwidth with `streams` interleaved streams per thread} where our CPU kernels
    load (common.measure_read_bandwidth), else {}. One stream per thread (x.sum()) reads ~1.4x slower on the 2-core
    VM than the decode kernels do: floors from both are reported, x_floor_multi_stream the stricter."""
    from chatterbox_fast import kernels

    if not kernels.load():
        return {}
    return {"bandwidth_multi_gbs": common.measure_read_bandwidth(repeats=3, streams=streams)}


def summarize(impls: dict, rounds: list[dict], weight_bytes: int) -> list[dict]:
    """Per implementation: pooled medians, and the per-round ratios (each round pairs everyone with one machine
    state and one bandwidth probe) summarised by their median."""
    rows = []
    for name, r in impls.items():
        if "error" in r:
            rows.append({"impl": name, "error": r["error"]})
            continue
        per_round = [rd[name] for rd in rounds]
        x_floor = [statistics.median(p["step_ms"]) / (weight_bytes / (rd["bandwidth_gbs"] * 1e9) * 1e3)
                   for p, rd in zip(per_round, rounds)]
        row = {
            "impl": name,
            "ms_per_token": statistics.median([t for p in per_round for t in p["step_ms"]]),
            "ms_per_token_min": min(t for p in per_round for t in p["step_ms"]),
            "forward_ms": statistics.median([t for p in per_round for t in p["forward_ms"]]),
            "prefill_ms": r.get("prefill_ms"),
            "x_floor": statistics.median(x_floor),  # 1 = at the read-bandwidth floor
            "compile_s": r.get("compile_s"),
        }
        if all("bandwidth_multi_gbs" in rd for rd in rounds):  # the stricter floor: the multi-stream read probe
            row["x_floor_multi_stream"] = statistics.median(
                statistics.median(p["step_ms"]) / (weight_bytes / (rd["bandwidth_multi_gbs"] * 1e9) * 1e3)
                for p, rd in zip(per_round, rounds))
        row["achieved_gbs"] = weight_bytes / (row["ms_per_token"] * 1e-3) / 1e9
        if "reference" in impls and "error" not in impls["reference"] and name != "reference":
            speed = [statistics.median(rd["reference"]["step_ms"]) / statistics.median(rd[name]["step_ms"])
                     for rd in rounds]
            row["speedup_vs_reference"] = statistics.median(speed)  # reference ms / ours ms, median over rounds
            row["speedup_vs_reference_per_round"] = speed
        rows.append(row)
    return rows


def print_table(rows: list[dict], floor_ms: float, bandwidth_gbs: float, threads: int) -> None:
    print(f"\nT3 decode, batch 2 (CFG), {threads} threads. {NOTE}.")
    print(f"floor = linear weights / {bandwidth_gbs:.1f} GB/s (median probe) = {floor_ms:.1f} ms/token")
    print(f"{'impl':<20}{'ms/token':>10}{'min':>8}{'fwd ms':>9}{'prefill':>9}{'GB/s':>7}{'x floor':>9}"
          f"{'x multi':>9}{'vs ref':>8}{'compile':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<20}  ERROR: {r['error'][:300]}")
            continue
        sp = r.get("speedup_vs_reference")
        sp = f"{sp:.2f}x" if sp else "-"
        cs = f"{r['compile_s']:.0f}s" if r["compile_s"] is not None else "-"
        pf = f"{r['prefill_ms']:.0f}" if r["prefill_ms"] is not None else "-"
        print(f"{r['impl']:<20}{r['ms_per_token']:>10.1f}{r['ms_per_token_min']:>8.1f}{r['forward_ms']:>9.1f}"
              f"{pf:>9}{r['achieved_gbs']:>7.1f}{r['x_floor']:>9.2f}{r.get('x_floor_multi_stream', float('nan')):>9.2f}"
              f"{sp:>8}{cs:>9}")
    print("ms/token: median over all timed steps; x floor, vs ref: median over rounds of the per-round ratios; "
          "x multi: against the multi-stream read probe (the stricter floor)")


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per implementation")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds the steps are split into")
    ap.add_argument("--warmup", type=int, default=8, help="untimed decode steps first")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads, both sides")
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: the oracle's random one)")
    ap.add_argument("--modes", default="eager,compiled", help=f"ours, comma-separated, from {sorted(MODES)}")
    ap.add_argument("--text-len", type=int, default=60, help="text ids (without SOT/EOT); prefill = 34 + this + 4")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference (oracle venv)")
    ap.add_argument("--compile-timeout", type=int, default=1200, help="seconds per compiled mode, then eager")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "t3_decode.json")
    a = ap.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {sorted(MODES)}")
    if a.rounds < 1 or a.steps < a.rounds or a.warmup < 0 or a.threads < 1 or a.text_len < 1:
        ap.error("need --rounds >= 1, --steps >= --rounds, --warmup >= 0, --threads >= 1, --text-len >= 1")
    a.ckpt = a.ckpt or oracle_paths.ckpt_dir()
    if not (a.ckpt / "t3_cfg.safetensors").is_file():
        ap.error(f"no t3_cfg.safetensors in {a.ckpt} (build the oracle: make oracle)")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()
    chunk = args.steps // args.rounds

    model = load_ours(args.ckpt)
    if "fused" in args.modes:
        model.fuse_projections()  # before any mode compiles: every mode then runs the fused q/k/v and gate/up GEMMs
        pack_t3(model)  # (an int8 model: the packed layout for every mode, so nothing recompiles later)
    x = prefill_input(model, args.ckpt, args.text_len)
    S = x.shape[1]
    model.setup_caches(2, S + args.warmup + chunk * args.rounds + 2)
    weight_bytes = linear_weight_bytes(model)

    impls: dict = {}
    ours: dict[str, Ours] = {}
    for name in args.modes:  # compile everything first (CPU heavy), then time
        o = Ours(model, name, S, args)
        print(f"ours {name}: compiling ..." if o.step.is_compiled else f"ours {name}", flush=True)
        try:
            o.compile(args.compile_timeout)
        except CompileTimeout as err:
            o.step._fall_back(err)
        if o.compile_s is not None and not o.step.is_compiled:
            impls[name] = {"error": f"compile failed, not timed: {o.step.fallback_reason}"}
            continue
        impls[name] = {"impl": f"ours ({name}: mode={o.mode}, freezing={o.freezing})", "compile_s": o.compile_s,
                       "rss_gb_after_compile": common.rss_gb()}
        ours[name] = o
        if o.compile_s is not None:
            print(f"  compiled in {o.compile_s:.0f} s; process RSS {common.rss_gb() or float('nan'):.1f} GB", flush=True)

    ref = None
    if not args.no_reference:
        print("reference (oracle venv): loading, prefill ...", flush=True)
        try:
            ref = Reference(args)
            impls["reference"] = {"impl": "reference chatterbox-tts 0.1.7 (T3.inference, HF Llama, eager attention)",
                                  "prefill_ms": ref.ready["prefill_ms"], "prefill_len": ref.ready["prefill_len"],
                                  "torch_version": ref.ready["torch_version"]}
            if ref.ready["prefill_len"] != S:
                raise RuntimeError(f"reference prefill length {ref.ready['prefill_len']} != ours {S}")
        except (RuntimeError, OSError) as err:
            impls["reference"] = {"error": str(err)}
            ref = None
    pf = time_prefill(model, x)  # same eager prefill for all our modes, right after the reference's
    for name in ours:
        impls[name]["prefill_ms"] = pf

    # warm-up at positions S.., then rounds: every implementation decodes the same positions once per round, in a
    # rotating order, with one bandwidth probe per round
    if ref is not None and args.warmup:
        ref.run(args.warmup)
    for o in ours.values():
        if args.warmup:
            o.run(args.warmup, S)
    rounds = []
    try:
        for r in range(args.rounds):
            pos = S + args.warmup + r * chunk
            order = (["reference"] if ref is not None else []) + list(ours) + ["bandwidth"]
            k = r % len(order)
            rd: dict = {"pos": pos}
            for name in order[k:] + order[:k]:
                if name == "bandwidth":
                    rd["bandwidth_gbs"] = common.measure_read_bandwidth(repeats=3)
                    rd.update(multi_stream_bandwidth())
                elif name == "reference":
                    c = ref.run(chunk)
                    rd["reference"] = {"step_ms": c["step_ms"], "forward_ms": c["forward_ms"], "pos": c["pos"][0]}
                else:
                    rd[name] = ours[name].run(chunk, pos)
            rounds.append(rd)
            line = "  ".join(f"{n} {statistics.median(rd[n]['step_ms']):.0f}" for n in impls if n in rd)
            print(f"round {r + 1}/{args.rounds} (pos {pos}): {line} ms/token; {rd['bandwidth_gbs']:.1f} GB/s",
                  flush=True)
    finally:
        if ref is not None:
            ref.close()

    bandwidth = statistics.median(rd["bandwidth_gbs"] for rd in rounds)
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    rows = summarize(impls, rounds, weight_bytes)
    mean_pos = S + args.warmup + chunk * args.rounds // 2
    kv = kv_read_bytes(model.cfg, 2, mean_pos)
    data = {
        "benchmark": "t3_decode",
        "note": NOTE,
        "started": started,
        "machine": common.machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "read_bandwidth_gbs": {"median": bandwidth, "per_round": [rd["bandwidth_gbs"] for rd in rounds]},
        "read_bandwidth_multi_stream_gbs": [rd.get("bandwidth_multi_gbs") for rd in rounds],
        "linear_weight_bytes_per_token": weight_bytes,
        "kv_read_bytes_per_token_mean": kv,
        "floor_ms_per_token": floor_ms,
        "floor_with_kv_ms_per_token": (weight_bytes + kv) / (bandwidth * 1e9) * 1e3,
        "prefill_len": S,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sampling": dataclasses.asdict(PARAMS),
        "impls": impls,
        "summary": rows,
        "rounds": rounds,
    }
    common.write_json(args.out, data)
    print_table(rows, floor_ms, bandwidth, args.threads)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
