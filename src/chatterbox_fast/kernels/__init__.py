"""Optional C++ CPU kernels (`cpu_linear.cpp`): T3 decode's weight-only int8 / bf16 linears and attention, and the
full self-attention of S3Gen's CFM estimator.

They are compiled from source on the first `load()` (the engine calls it when it loads on a CPU) with the system
C++ compiler (the one torch.compile's CPU backend also needs), against the installed torch's headers, and cached
under `~/.cache/chatterbox-fast/kernels/<hash>/` (the hash covers the source, torch's version, the compiler and the
flags, so a torch upgrade rebuilds). Build once:
~15 s on a 2-core machine. If anything fails (no compiler, no headers, a torch whose C++ API differs), `load()`
logs one warning and returns False, and callers keep their pure-PyTorch path: the package never needs these.

Ops, registered by the shared library (TORCH_LIBRARY, so the dispatcher calls them from C++ and torch.compile keeps
them in one graph as extern calls; fake implementations below give their output shapes):
- `torch.ops.chatterbox_fast.int8_linear(x (M, K) f32, w (N, K) int8, scale (N,) f32) -> (M, N) f32`
- `torch.ops.chatterbox_fast.int8_linear_packed(x, w (N / 8, K / 64, 8, 64) int8, scale)`: the same on a weight in
  `quantize.pack_weight`'s layout (one sequential stream per block of 8 rows). In AVX-512 builds (K <= 8192) it rounds
  each row of x to int16 (per-row scale) and multiplies in integers, 4 blocks in flight per thread: ~1.4x faster,
  within ~3e-5 of the fp32 math relative to the output's largest value (`int8_packed_int16_activations()`);
  elsewhere bit-identical to `int8_linear`. `bf16_linear_packed(x, w (N / 8, K / 32, 8, 32) bf16)`: bit-identical
  to `bf16_linear`.
- `torch.ops.chatterbox_fast.bf16_linear(x (M, K) f32, w (N, K) bf16) -> (M, N) f32`; `f32_linear(x, w (N, K) f32)`:
  the fp32 layer linears' kernel, each row's result the same bits for any M (T3's speech head in the fused step)
`int8_linear` and the bf16 ops accumulate in fp32 over fp32 activations: the only rounding is the stored weight's.
- `torch.ops.chatterbox_fast.decode_attention(q (B, H, 1, D), k_cache, v_cache (B, H, S, D), input_pos (1,), scale)
  -> (B, H, 1, D)`: T3's single-query attention over the cache slots <= input_pos, fp32 math over an fp32 or a
  bf16 cache (bf16 rows widened in registers: half the bytes; see the source).
- `torch.ops.chatterbox_fast.full_attention(q, k, v (B, T, H, D), scale) -> (B, T, H, D)` contiguous: unmasked
  softmax(q k^T * scale) v per (batch, head), fp32, on (B, T, H, D) views with a contiguous last dim (no transposes);
  the estimator's attention (register-tiled AVX-512 / AVX2 paths for D = 64, a plain loop otherwise).
- `torch.ops.chatterbox_fast.full_attention_int8(q, k, v, scale, force_portable=False)`: the same on int8 dot
  products (the opt-in `s3gen_quantize="int8-attn"`): scores from centred int8 keys and int8 queries (per-row
  scales), fp32 softmax rounded to u8 probability levels, P V against centred per-channel int8 values, both integer
  sums exact; AVX512-VNNI tiles for D = 64 on a VNNI CPU (`int8_attention_ready()`), else a portable loop with the
  same arithmetic (bit-identical, slow: tests only).
- `torch.ops.chatterbox_fast.full_attention_bf16(q, k, v (B, T, H, 64) bf16, scale) -> (B, T, H, 64) bf16`: the
  estimator's attention in `s3gen_quantize="bf16"` on AMX tiles (bf16 products, fp32 sums, fp32 softmax, bf16
  probabilities, as SDPA's bf16 CPU kernel does); CPUs with AMX-BF16 only (`bf16_attention_ready()`).
- `torch.ops.chatterbox_fast.quantize_rows(x (M, K) f32) -> (q (M, K) int8, s (M,) f32)`: per-row symmetric int8
  (q = round(x * 127 / max|x_m|), s = max|x_m| / 127); `dequant_rows(acc (M, N) int32, sx (M,), sw (N,), bias?)
  -> (M, N) f32` = acc * sx[m] * sw[n] + bias[n], and `dequant_rows_acc_(y, ...)` adding that into y in place: the
  two elementwise passes around `torch._int_mm` of the opt-in int8 estimator GEMMs (quantize.W8A8Linear).
- `torch.ops.chatterbox_fast.quantize_weight_int8(w (N, K) f32, bf16_scales) -> (q (N, K) int8, scale (N,) f32)`:
  `quantize.quantize_weight_int8`'s formula (per-row scale max|w| / 127, bf16-rounded if asked; q = round(w / s)),
  bit for bit, in one pass per row (T3's int8 copies at load: the speculative draft, `quantize="int8"`).
- `torch.ops.chatterbox_fast.layer_norm_fused(x (..., C), add (C,)?, weight, bias, eps, mish) -> y`: LayerNorm over
  the last dim of x + add (add, when given, is written into x first: a GEMM's pending bias), then Mish if `mish`;
  `bias_gelu_(y (..., N), bias (N,))`: y = gelu(y + bias) in place, exact (erf) GELU. The estimator's elementwise
  passes in one pass each (fp32; they differ from ATen by float rounding, as ATen's own kernels differ by ISA).
- `torch.ops.chatterbox_fast.snake(x (B, C, T) f32, alpha (C,)) -> y`: HiFT's Snake, x + sin^2(alpha x) / (alpha +
  1e-9), in one pass over contiguous or channels-last x (y in x's layout); a vectorised sin (Cody-Waite + Cephes,
  ~1 ulp), std::sin for |alpha x| >= 8192.
- `torch.ops.chatterbox_fast.copy_kv_slots(src_k, src_v, dst_k, dst_v, dst_scales, start, stop) -> ()`: cache slots
  [start, stop) of every layer from fp32 caches into caches of one dtype (fp32, bf16, or int8 with their row scales,
  written as `KVCache.update` writes them): the speculative draft catching up on the target's slots in one call.
- `torch.ops.chatterbox_fast.read_probe(x (n,) f32, streams) -> () f64`: the sum of x, each thread reading its share as
  `streams` interleaved streams (benchmarks/common.py's multi-stream read-bandwidth probe).
- `torch.ops.chatterbox_fast.decode_layers(x (B, D) or (T, B, D), weights, scales, norms, k_caches, v_caches,
  kv_scales, rope, input_pos, eps) -> x's shape`: every T3 layer of one decode step in one call (generation/fused.py),
  writing each layer's k / v into its cache slot input_pos (T tokens: slots input_pos .. + T - 1, causal attention
  among them: the speculative decoder's verification); int8 / bf16 / fp32 layer weights, fp32 / bf16 / int8 caches
  (int8: per-row scales in kv_scales, 2 per layer; empty otherwise), fp32 math.

Environment:
- CHATTERBOX_FAST_CPU_KERNELS=0 disables them (the pure-PyTorch paths run).
- CHATTERBOX_FAST_CPU_ISA=avx512|avx2|scalar forces the instruction set of the build (default: what torch reports
  for this CPU, `torch.backends.cpu.get_cpu_capability()`); used by the tests to check every build.
- CHATTERBOX_FAST_CPU_VNNI=0 makes an AVX-512 build run as on a CPU without AVX512-VNNI (for tests): the int8 linear
  multiplies with vpmaddwd + vpaddd instead of vpdpwssd (the same exact sums), int8 attention takes its portable
  path.
- CHATTERBOX_FAST_CPU_AMX=0 makes `full_attention_bf16` unavailable (the bf16 estimator then uses SDPA).
- CXX: the compiler (default `c++`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_linear.cpp")
ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
    "scalar": (),
}
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "isa": None, "error": None, "int8_attn": False}


def default_isa() -> str:
    """The ISA to build for: CHATTERBOX_FAST_CPU_ISA, else torch's view of this CPU (AVX512 / AVX2 / other)."""
    forced = os.environ.get("CHATTERBOX_FAST_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"CHATTERBOX_FAST_CPU_ISA must be one of {sorted(ISA_FLAGS)}, got {forced!r}")
        return forced
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "avx512"
    return "avx2" if cap.startswith("AVX2") else "scalar"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chatterbox-fast" / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)")
    return path


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def build_command(src: Path, out: Path, isa: str, cxx: str, std: str) -> list[str]:
    """The compiler command line: a shared library against torch's headers and libraries, for one ISA."""
    root = Path(torch.__file__).resolve().parent
    includes = [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"]
    libdir = root / "lib"
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [cxx, "-O3", f"-std={std}", "-fPIC", "-shared", "-fopenmp", "-DNDEBUG", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *ISA_FLAGS[isa],
            *[f"-I{p}" for p in includes if p.is_dir()], str(src), "-o", str(out),
            f"-L{libdir}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libdir}"]


def _build(isa: str) -> Path:
    """Compile (or find in the cache) the library for `isa`; returns its path."""
    cxx = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, torch.__version__.encode(), _compiler_version(cxx).encode(),
                                     isa.encode(), " ".join(ISA_FLAGS[isa]).encode()])).hexdigest()[:16]
    target = cache_root() / f"{key}-{isa}" / "cbf_cpu_linear.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for std in ("c++20", "c++17"):  # torch >= 2.13's headers want C++20 features; older ones build as C++17
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = build_command(SOURCE, Path(tmp), isa, cxx, std)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
            return target
        os.unlink(tmp)
        errors.append(f"-std={std}: {res.stderr.strip()[-2000:]}")
    raise RuntimeError("compiling cpu_linear.cpp failed:\n" + "\n".join(errors))


def _register_fakes() -> None:
    """Output shapes for tracing (torch.compile, meta tensors): (M, K) x (N, K) -> (M, N) float32."""
    @torch.library.register_fake("chatterbox_fast::int8_linear")
    def _int8_linear_fake(x, w, scale):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("chatterbox_fast::int8_linear_packed")
    def _int8_linear_packed_fake(x, w, scale):
        return x.new_empty((x.shape[0], scale.shape[0]))

    @torch.library.register_fake("chatterbox_fast::bf16_linear")
    def _bf16_linear_fake(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("chatterbox_fast::f32_linear")
    def _f32_linear_fake(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("chatterbox_fast::bf16_linear_packed")
    def _bf16_linear_packed_fake(x, w):
        return x.new_empty((x.shape[0], w.shape[0] * w.shape[2]))

    @torch.library.register_fake("chatterbox_fast::decode_attention")
    def _decode_attention_fake(q, k_cache, v_cache, input_pos, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("chatterbox_fast::full_attention")
    def _full_attention_fake(q, k, v, scale):
        return q.new_empty(q.shape)  # contiguous (B, T, H, D)

    @torch.library.register_fake("chatterbox_fast::full_attention_int8")
    def _full_attention_int8_fake(q, k, v, scale, force_portable=False):
        return q.new_empty(q.shape)

    @torch.library.register_fake("chatterbox_fast::full_attention_bf16")
    def _full_attention_bf16_fake(q, k, v, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("chatterbox_fast::quantize_rows")
    def _quantize_rows_fake(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1])

    @torch.library.register_fake("chatterbox_fast::quantize_weight_int8")
    def _quantize_weight_int8_fake(w, bf16_scales):
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:1])

    @torch.library.register_fake("chatterbox_fast::dequant_rows")
    def _dequant_rows_fake(acc, sx, sw, bias):
        return acc.new_empty(acc.shape, dtype=torch.float32)

    @torch.library.register_fake("chatterbox_fast::dequant_rows_acc_")
    def _dequant_rows_acc_fake(y, acc, sx, sw, bias):
        return None

    @torch.library.register_fake("chatterbox_fast::layer_norm_fused")
    def _layer_norm_fused_fake(x, add, weight, bias, eps, mish):
        return x.new_empty(x.shape)

    @torch.library.register_fake("chatterbox_fast::bias_gelu_")
    def _bias_gelu_fake(y, bias):
        return None

    @torch.library.register_fake("chatterbox_fast::snake")
    def _snake_fake(x, alpha):
        return x.new_empty_strided(x.shape, x.stride())

    @torch.library.register_fake("chatterbox_fast::decode_layers")
    def _decode_layers_fake(x, weights, scales, norms, k_caches, v_caches, kv_scales, rope, input_pos, eps):
        return x.new_empty(x.shape)


def load() -> bool:
    """Build (once, cached) and load the CPU kernels; True when `torch.ops.chatterbox_fast.*` can be called.

    Never raises for a failed build: it logs one warning with the reason and returns False (see `error()`).
    """
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        _state["tried"] = True
        if os.environ.get("CHATTERBOX_FAST_CPU_KERNELS", "1").strip() in ("0", "false", "no", "off"):
            _state["error"] = "disabled by CHATTERBOX_FAST_CPU_KERNELS"
            return False
        try:
            isa = default_isa()
            path = _build(isa)
            torch.ops.load_library(str(path))
            _register_fakes()
        except Exception as e:  # noqa: BLE001 -- any failure means: use the pure-PyTorch path
            _state["error"] = f"{type(e).__name__}: {e}"
            logger.warning("chatterbox_fast CPU kernels unavailable, using the PyTorch fallback (%s)",
                           _state["error"].splitlines()[0])
            return False
        try:  # whether full_attention_int8's AVX512-VNNI path applies (AVX-512 build on a VNNI CPU)
            lib = ctypes.CDLL(str(path))
            int8_attn = bool(lib.cbf_attention_int8_fast())
            bf16_attn = bool(lib.cbf_attention_bf16_amx())  # also asks Linux for the AMX tile state
        except (OSError, AttributeError):
            int8_attn = bf16_attn = False
        _state.update(ok=True, isa=isa, int8_attn=int8_attn, bf16_attn=bf16_attn)
        logger.info("chatterbox_fast CPU kernels loaded (%s, %s)", isa, path)
        return True


def available() -> bool:
    """True when the kernels are loaded (does not try to build: call `load()` first)."""
    return _state["ok"]


def decode_attention_ready() -> bool:
    """True when T3's decode step should use `chatterbox_fast::decode_attention` (loaded, AVX-512 build: the portable
    build's loop would be slower than ATen's kernel)."""
    return _state["ok"] and _state["isa"] == "avx512"


def full_attention_ready() -> bool:
    """True when S3Gen's estimator should use `chatterbox_fast::full_attention`: loaded, AVX-512 or AVX2 build
    (measured 1.4-1.6x and 1.2-1.4x ATen's SDPA of the same ISA); the portable build's plain loop is slower."""
    return _state["ok"] and _state["isa"] in ("avx512", "avx2")


def elementwise_ready() -> bool:
    """True when S3Gen's estimator should use `layer_norm_fused` / `bias_gelu_` (loaded, AVX-512 or AVX2 build:
    one vectorised pass where ATen makes two to four; the portable build's scalar loops would be slower)."""
    return _state["ok"] and _state["isa"] in ("avx512", "avx2")


def int8_packed_int16_activations() -> bool:
    """True when `int8_linear_packed` (and the fused decode step on packed int8 weights) rounds each row of x to int16
    and multiplies in integers (AVX-512 builds, K <= 8192): results within ~3e-5 of the row-major kernel's fp32 math,
    relative to the output's largest value. Elsewhere both kernels give bit-identical results."""
    return _state["ok"] and _state["isa"] == "avx512"


def int8_attention_ready() -> bool:
    """True when `chatterbox_fast::full_attention_int8` runs its fast path (AVX-512 build on a CPU with
    AVX512-VNNI); elsewhere the op runs a portable loop that is much slower than fp32 attention."""
    return _state["ok"] and bool(_state.get("int8_attn"))


def bf16_attention_ready() -> bool:
    """True when `chatterbox_fast::full_attention_bf16` can run: AVX-512 build (GCC >= 11) on a CPU with AMX-BF16
    whose tile state Linux granted; elsewhere the bf16 estimator uses SDPA."""
    return _state["ok"] and bool(_state.get("bf16_attn"))


def isa() -> str | None:
    """The ISA of the loaded build ('avx512', 'avx2', 'scalar'), or None."""
    return _state["isa"]


def error() -> str | None:
    """Why the kernels are not available, if `load()` failed or was disabled."""
    return _state["error"]
