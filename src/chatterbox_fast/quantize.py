"""Weight-only int8 (and bf16) for T3's decode-time linears (`quantize_t3(model, "int8" | "bf16")`), and the opt-in
int8 or bf16 GEMMs (weights AND activations) of S3Gen's flow estimator on CPU (`quantize_s3gen`, `W8A8Linear`,
`Bf16GemmLinear`, at the end of this file; the engine's `s3gen_quantize="int8"` / `"bf16"`).

"bf16" (`Bf16Linear`): the weights stored in bf16, the math in fp32 (our CPU kernel widens them in registers).
Half the bytes of fp32, relative weight rounding 2^-9: what `use_mixed_precision=True` means for T3 on a CPU (its
decode reads weights; bf16 activations would buy nothing there). On CPUs with native bf16 (AMX / AVX512-BF16,
`cpu_has_fast_bf16`) use_mixed_precision also runs S3Gen's flow estimator in bf16 (`quantize_s3gen(..., "bf16")`,
`Bf16GemmLinear`: compute-bound GEMMs, where native bf16 pays). The rest of this docstring is about int8.

Decoding one token reads every linear weight once, so on a CPU (and at batch 2 on a GPU) T3 is bound by weight
bytes: int8 weights read 4x fewer bytes than fp32 (0.50 GB instead of 2.01 GB for the 30 layers).

Scheme: per-output-channel symmetric int8, `w[n, :] ~= scale[n] * q[n, :]`, q in [-127, 127], scale = max|w[n, :]|
/ 127 (round to nearest). Activations are not quantised. What is quantised: the seven Llama linears of every layer
(q/k/v/o, gate/up/down: 99.3 % of the weight bytes a decode step reads besides the head). What is not:
- `speech_head` (1024 x 8194, 34 MB fp32, 6 % of the int8 step's bytes): its outputs are the logits that the
  sampler turns into probabilities directly, with no later layer to average the rounding out, and T3 takes its
  model dtype from its embeddings (caches, conditioning). Quantising it would save ~1 ms/token at best. (The
  speculative decoder's draft, whose logits only steer, does use an int8 copy: generation/speculative.py.)
- the conditioning encoder, embeddings and `text_head`: run once per request (or never), not per token.

Kernels (`Int8Linear.forward`):
- CPU, up to CPU_KERNEL_MAX_ROWS rows (decode), fp32 activations: our C++ kernel
  `torch.ops.chatterbox_fast.int8_linear` (kernels/cpu_linear.cpp, compiled on first use, cached): it reads the int8
  weight, widens it to fp32 in registers and accumulates in fp32 over the unrounded fp32 activations, so its result
  is the dequantised weight's fp32 product (to summation order). ~1.6x faster than `_weight_int8pack_mm` over T3's
  210 linears at batch 2 on the 2-core AVX-512 machine (BENCHMARKS.md).
- CPU decode without that kernel (no compiler, CHATTERBOX_FAST_CPU_KERNELS=0):
  `torch.ops.aten._weight_int8pack_mm(x_bf16, q, scale_bf16)`, activations cast to bf16 and the result back to the
  model dtype. That kernel reads the int8 weight directly (no dequantised copy); with fp32 activations it takes a
  slow path (~17x slower at batch 2, BENCHMARKS.md), hence the bf16 round trip, which adds a bf16 rounding of the
  activations and of the output (relative 2^-9, below the int8 weight rounding).
- CPU prefill (more rows than the kernel takes) on a CPU with native bf16 (AMX / AVX512-BF16, `cpu_has_fast_bf16`):
  one bf16 GEMM, `F.linear(bf16(x), bf16(q)) * scale` (the int8 values are exact in bf16; x and the GEMM's output
  rounded to bf16, relative 2^-9): T3's prefill 2.0-2.3 s -> 0.6-1.0 s for a 144-position prompt on the 2-core AMX
  VM, first-token distribution within TV 0.001 of the fp32-math prefill (int8's own drift: 0.016). `_bf16_prefill_gemm`.
- elsewhere (CUDA, MPS, a torch without the op) and for more rows (CPU prefill without native bf16):
  `F.linear(x, q.to(x.dtype)) * scale`, correct on every device. The float weight it makes is a temporary of one
  layer, freed after the call.
  (On CUDA, whether torch.compile fuses the int8 -> float conversion into the GEMM is not measured yet: in
  inductor's default mode the GEMM is an extern cuBLAS call, so the conversion is likely a kernel of its own.)
The CPU engine's decode step calls the same kernel from inside `chatterbox_fast::decode_layers` (all layers in
one call, generation/fused.py), so the forward above runs there for prefill and the module path only. For that step
the engine also packs the int8 / bf16 weights (`pack_t3`: each block of 8 rows stored line by line, one sequential
stream for the kernel); the module path then unpacks a temporary copy for prefill. On packed int8 weights the
AVX-512 kernel rounds each activation row to int16 (per-row scale; 2^-16 of the row's largest value) and multiplies
in integers with 4 weight streams in flight per thread: ~1.4x faster than the fp32-math kernel on T3's shapes, the
output within ~3e-5 of it relative to the largest value (below the int8 weights' own rounding by ~100x; the drift
against fp32 T3 is measured in BENCHMARKS.md). bf16 packing is bit-identical.
fbgemm's dynamic int8 (`torch.ao.nn.quantized.dynamic.Linear`) is ~1.2x faster eager on the CPU measured (AVX-512
VNNI, no native bf16; BENCHMARKS.md) but is not used: it quantises the activations too (per tensor, 7 bits: 2.2x
the output error of one layer), torch has deprecated its quantised-tensor API, and its torchbind packed weights
keep dynamo from one full graph; the compiled step below beats it anyway.

Compilation: the CPU path keeps `_weight_int8pack_mm` in the graph; inductor lowers it to the same ATen kernel, or
under max-autotune to its C++ micro-GEMM over the int8 weights (2.8x fp32 eager vs 2.0x with the default mode,
BENCHMARKS.md), so the compiled step reads the same int8 bytes, and with freezing its constants stay int8. Trap
avoided: with inductor freezing, a dequantise-then-matmul written in the graph (the fallback's form) is
constant-folded back to a float weight, fast but no longer int8; the CPU decode path never writes that form.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as cpu_kernels
from .models.t3 import T3

QUANT_MODES = ("int8", "bf16")
# Attribute paths under tfmr.layers[i]: the checkpoint's 7 linears per Llama layer; quantize_t3 first fuses q/k/v
# and gate/up (T3 Attention.fuse / MLP.fuse: bit-identical with per-output-channel scales), then converts the 4
# linears of T3_INT8_TARGETS.
T3_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
T3_INT8_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")
# Rows (batch x positions) up to which the CPU int8 kernel is used. It is a GEMV-style kernel: at decode's 2 rows it
# reads 4x fewer bytes than fp32, but it does not block for reuse, so past ~64 rows (prefill: 2 x ~100-300) it
# falls behind a float GEMM on a weight dequantised for the call (measured on 4096 x 1024, 2 threads: 2 rows 3.6 vs
# 5.0 ms fp32; 64 rows 19 vs 14; 324 rows 116 vs 41 ms, dequantise + fp32 GEMM 39 ms).
CPU_KERNEL_MAX_ROWS = 64


def _use_cpu_kernel(x: Tensor, rows: int) -> bool:
    """Our C++ decode kernels (kernels/) apply: fp32 activations on the CPU, decode-sized, the kernels loaded."""
    return (x.device.type == "cpu" and rows <= CPU_KERNEL_MAX_ROWS and x.dtype == torch.float32
            and cpu_kernels.available())


def _bf16_prefill_gemm(x: Tensor, rows: int) -> bool:
    """The quantised T3 linears multiply in bf16: a prefill-sized fp32 input (more rows than our decode kernels take)
    on a CPU with native bf16 (`cpu_has_fast_bf16`: oneDNN's AMX GEMM, ~4x its fp32 one on T3's prefill shapes, 2
    cores), no autograd. The int8 / bf16 weight values are exact in bf16; x and the GEMM's output are rounded to bf16
    (relative 2^-9, below the int8 weights' own rounding; for bf16 weights it is what mixed precision means)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and rows > CPU_KERNEL_MAX_ROWS
            and not torch.is_grad_enabled() and cpu_has_fast_bf16())


def _check_mode(name: str, mode: str | None, allowed: tuple[str, ...]) -> str | None:
    if mode is not None and mode not in allowed:
        raise ValueError(f"{name} must be None or one of {allowed}, got {mode!r}")
    return mode


KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}  # kv_cache= -> T3.kv_dtype


def check_kv_cache_mode(mode: str | None) -> str | None:
    """None (the engine's default: fp32, bf16 in the CPU's low-precision modes) or a key of KV_CACHE_DTYPES."""
    return _check_mode("kv_cache", mode, tuple(KV_CACHE_DTYPES))


def check_quantize_mode(mode: str | None) -> str | None:
    """None (no quantisation) or one of QUANT_MODES; anything else raises ValueError naming the allowed values."""
    return _check_mode("quantize", mode, QUANT_MODES)


_QUANT_ROWS = 128  # quantize_weight_int8's block of rows


def quantize_weight_int8(w: Tensor, bf16_scales: bool = True) -> tuple[Tensor, Tensor]:
    """(N, K) float weight -> (q (N, K) int8 in [-127, 127], scale (N,) fp32) with w ~= scale[:, None] * q.

    With `bf16_scales` (T3) the scales are rounded to bf16 values (kept in fp32) before q is computed: the CPU
    kernel takes its scales in bf16, so every path (bf16 kernel, fp32 fallback) then stands for the same dequantised
    weight. Without it (W8A8Linear) they are max|w[n, :]| / 127 in fp32.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    wf = w.detach().float()
    if _w8a8_kernels(wf):  # the same formula in one C++ pass per row, bit for bit (~3x faster)
        return torch.ops.chatterbox_fast.quantize_weight_int8(wf, bf16_scales)
    return _quantize_weight_int8_torch(wf, bf16_scales)


def _quantize_weight_int8_torch(wf: Tensor, bf16_scales: bool) -> tuple[Tensor, Tensor]:
    """quantize_weight_int8 in PyTorch ops (no kernels, other devices; the C++ op's reference in the tests)."""
    N, K = wf.shape
    scale = torch.empty(N, dtype=torch.float32, device=wf.device)
    q = torch.empty(N, K, dtype=torch.int8, device=wf.device)
    # CPU: blocks of rows whose temporaries stay in cache (~5x faster); a GPU takes the weight whole
    rows = _QUANT_ROWS if wf.device.type == "cpu" else max(N, 1)
    tmp = torch.empty(min(rows, N), K, dtype=torch.float32, device=wf.device)
    for r in range(0, N, rows):
        wr, t = wf[r:r + rows], tmp[:min(rows, N - r)]
        s = torch.abs(wr, out=t).amax(dim=1) / 127.0  # (rows,)
        if bf16_scales:
            s = s.to(torch.bfloat16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: q = 0 with any scale
        scale[r:r + rows] = s
        torch.div(wr, s[:, None], out=t)
        q[r:r + rows].copy_(t.round_().clamp_(-127, 127))
    return q, scale


PACK_ROWS, PACK_LINE = 8, 64  # the C++ kernel's block of output channels, and one cache line (bytes)


def _pack_cols(w: Tensor) -> int:
    return PACK_LINE // w.element_size()  # columns per line: 64 int8, 32 bf16


def pack_weight(w: Tensor) -> Tensor:
    """(N, K) int8 or bf16 -> (N / 8, K / c, 8, c), c = one 64-byte line (64 int8, 32 bf16): each block of 8 rows
    stored line by line, one line of each row in turn, so that the decode kernel reads a block as one sequential
    stream (kernels/cpu_linear.cpp, `int8_linear_packed` / `bf16_linear_packed`; bf16 results bit-identical to the
    row-major layout's, int8 ones with int16-rounded activations in AVX-512 builds). Needs N % 8 == K % c == 0."""
    if w.dim() != 2 or w.dtype not in (torch.int8, torch.bfloat16):
        raise ValueError(f"pack_weight needs an int8 or bfloat16 (N, K) weight, got {tuple(w.shape)} {w.dtype}")
    N, K = w.shape
    c = _pack_cols(w)
    if N % PACK_ROWS or K % c:
        raise ValueError(f"pack_weight needs N % {PACK_ROWS} == K % {c} == 0, got {tuple(w.shape)} {w.dtype}")
    return w.view(N // PACK_ROWS, PACK_ROWS, K // c, c).permute(0, 2, 1, 3).contiguous()


def unpack_weight(w: Tensor) -> Tensor:
    """The inverse of pack_weight: (N / 8, K / c, 8, c) -> (N, K) (a new tensor)."""
    nb, nc, r, c = w.shape
    return w.permute(0, 2, 1, 3).reshape(nb * r, nc * c)


class _PackableWeight:
    """`packed` / `pack_()` / `row_major_weight()` for a linear whose weight buffer (named by `_weight_name`) may be
    stored in pack_weight's layout, the fused CPU decode step's (one sequential stream per block of rows). Packing
    is in place and keeps no row-major copy; paths other than the CPU decode kernel unpack a temporary per call."""

    _weight_name = ""

    @property
    def packed(self) -> bool:
        """True after `pack_()`: the weight holds the (N / 8, K / c, 8, c) layout of `pack_weight`."""
        return getattr(self, self._weight_name).dim() == 4

    def pack_(self) -> bool:
        """Store the weight in the packed layout, in place (idempotent); False (and unchanged) when its shape does
        not allow it (N % 8, or K % one line's columns)."""
        if self.packed:
            return True
        w = getattr(self, self._weight_name)
        if w.shape[0] % PACK_ROWS or w.shape[1] % _pack_cols(w):
            return False
        setattr(self, self._weight_name, pack_weight(w))
        return True

    def row_major_weight(self) -> Tensor:
        """The (N, K) weight (unpacked into a new tensor if packed)."""
        w = getattr(self, self._weight_name)
        return unpack_weight(w) if self.packed else w


class Int8Linear(_PackableWeight, nn.Module):
    """A bias-free linear with an int8 weight (N, K) and per-output-channel scales (N,); no float weight kept.

    `scale` holds bf16-representable values in fp32 (the fallback's multiplier); `scale_bf16` is the same values in
    bf16, the copy the CPU kernel takes (scales in the activation dtype), precomputed so the forward has no extra op.
    """

    _weight_name = "weight_int8"

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("scale_bf16", torch.ones(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (T3's linears have none)")
        q, scale = quantize_weight_int8(linear.weight)
        mod = cls(linear.in_features, linear.out_features, device="meta")
        mod.weight_int8, mod.scale, mod.scale_bf16 = q, scale, scale.to(torch.bfloat16)
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight the int8 one stands for, (N, K): the reference for tests, not used in forward."""
        return self.row_major_weight().to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        lead = x.shape[:-1]
        rows = math.prod(lead)
        if _use_cpu_kernel(x, rows):
            x2 = x.reshape(rows, self.in_features).contiguous()  # (M, K)
            op = torch.ops.chatterbox_fast.int8_linear_packed if self.packed else torch.ops.chatterbox_fast.int8_linear
            y = op(x2, self.weight_int8, self.scale)  # (M, N) fp32
            return y.view(*lead, self.out_features)
        w = self.row_major_weight()
        if _bf16_prefill_gemm(x, rows):  # (M, K) bf16 @ (K, N) bf16 -> bf16, then the scales in fp32
            return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float().mul_(self.scale)
        if _HAS_INT8PACK and x.device.type == "cpu" and rows <= CPU_KERNEL_MAX_ROWS:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
            y = torch.ops.aten._weight_int8pack_mm(x2, w, self.scale_bf16)  # (M, N) bf16
            return y.to(x.dtype).view(*lead, self.out_features)
        return F.linear(x, w.to(x.dtype)) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8 per-channel{packed}"


class Bf16Linear(_PackableWeight, nn.Module):
    """A bias-free linear whose weight (N, K) is stored in bf16 and used with fp32 math (weight-only bf16).

    On the CPU this halves the bytes a decode step reads (1.0 GB instead of 2.0 GB for T3's layers) while the
    activations and accumulation stay fp32: the only rounding is the weight's, relative 2^-9. Decode-sized inputs
    (<= CPU_KERNEL_MAX_ROWS rows, fp32) run our C++ kernel `chatterbox_fast::bf16_linear`; prefill-sized ones on a
    CPU with native bf16 one bf16 GEMM (x and the output rounded to bf16 too, `_bf16_prefill_gemm`: ~3x faster);
    anything else (no kernel, another device) `F.linear` with the weight widened for the call (a temporary copy).
    """

    _weight_name = "weight_bf16"

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_bf16", torch.zeros(out_features, in_features, dtype=torch.bfloat16,
                                                        device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bf16Linear":
        if linear.bias is not None:
            raise ValueError("Bf16Linear has no bias (T3's linears have none)")
        mod = cls(linear.in_features, linear.out_features, device="meta")
        mod.weight_bf16 = linear.weight.detach().to(torch.bfloat16).contiguous()
        return mod

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        lead = x.shape[:-1]
        rows = math.prod(lead)
        if _use_cpu_kernel(x, rows):
            op = torch.ops.chatterbox_fast.bf16_linear_packed if self.packed else torch.ops.chatterbox_fast.bf16_linear
            y = op(x.reshape(rows, self.in_features).contiguous(), self.weight_bf16)  # (M, N) fp32
            return y.view(*lead, self.out_features)
        if _bf16_prefill_gemm(x, rows):
            return F.linear(x.to(torch.bfloat16), self.row_major_weight()).float()
        return F.linear(x, self.row_major_weight().to(x.dtype))

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=bf16{packed}"


_LINEAR_TYPES = {"int8": Int8Linear, "bf16": Bf16Linear}

S3GEN_QUANT_MODES = ("int8", "int8-attn", "bf16")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively: AMX-BF16 tiles (Sapphire Rapids and later Xeons) or
    AVX512-BF16 (`vdpbf16ps`: Cooper Lake, Zen 4). There oneDNN's bf16 GEMMs (what ATen's CPU bf16 matmul calls)
    run several times faster than fp32 (measured 4-6x with AMX on the estimator's shapes, 2 cores); elsewhere bf16
    is emulated and slower than fp32. The environment variable CHATTERBOX_FAST_CPU_BF16=0 / 1 overrides the check."""
    env = os.environ.get("CHATTERBOX_FAST_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(c()) for c in checks if c is not None)
    except Exception:  # noqa: BLE001 - a private helper missing or failing means "not known to be fast"
        return False


def _w8a8_kernels(t: Tensor) -> bool:
    """Our C++ quantise / dequantise passes apply: a CPU tensor with contiguous rows, the kernels loaded."""
    return t.device.type == "cpu" and t.stride(-1) == 1 and cpu_kernels.available()


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) float32 -> (q (M, K) int8, s (M,) float32), per-row symmetric: q = round(x * 127 / max|x_m|) (ties
    to even), s = max|x_m| / 127 (0 for an all-zero row), so x ~= s[:, None] * q. Our C++ kernel when loaded, else
    the same formula in PyTorch."""
    if _w8a8_kernels(x):
        return torch.ops.chatterbox_fast.quantize_rows(x)
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8), amax / 127.0


class W8A8Linear(nn.Module):
    """y = x W^T + b with int8 weights AND int8 activations: the opt-in int8 GEMMs of S3Gen's CFM estimator (CPU).

    W (N, K) is stored as per-output-channel symmetric int8 (`quantize_weight_int8`); each call quantises the rows
    of x to int8 on the fly (`quantize_rows_int8`), multiplies int8 x int8 -> int32 (`torch._int_mm`: oneDNN's VNNI
    kernel on x86, ~3x fp32's throughput on the 2-core AVX-512 machine) and dequantises in one pass:
    y = acc * s_x[m] * s_w[n] + b (`chatterbox_fast::dequant_rows`, or PyTorch ops without our kernels). The int32
    sums are exact; the error is the two roundings (weight and activation, each relative ~2^-8 of its row's max).
    Unlike `Int8Linear` (T3, weight-only) this changes the activations too: it is used only where it was measured
    (BENCHMARKS.md: the mel's drift) and only on request.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> "W8A8Linear":
        """From a float (N, K) weight and optional (N,) bias (copied: the module holds no view of them)."""
        q, scale = quantize_weight_int8(weight, bf16_scales=False)
        mod = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        mod.weight_int8, mod.scale = q, scale
        if bias is not None:
            mod.bias = bias.detach().float().clone()
        return mod

    def _int_mm(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (M, K) -> (acc (M, N) int32, s_x (M,))."""
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.float32:
            raise ValueError(f"W8A8Linear expects (M, {self.in_features}) float32 input, got {tuple(x.shape)} "
                             f"{x.dtype}")
        q, sx = quantize_rows_int8(x)
        return torch._int_mm(q, self.weight_int8.t()), sx

    def _dequant(self, acc: Tensor, sx: Tensor) -> Tensor:
        """PyTorch form of `chatterbox_fast::dequant_rows`: acc * sx[:, None] * scale + bias."""
        y = acc.float() * (sx[:, None] * self.scale)
        return y if self.bias is None else y.add_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (M, K) float32 -> (M, N) float32."""
        acc, sx = self._int_mm(x)
        if _w8a8_kernels(acc):
            return torch.ops.chatterbox_fast.dequant_rows(acc, sx, self.scale, self.bias)
        return self._dequant(acc, sx)

    def forward_acc_(self, y: Tensor, x: Tensor) -> Tensor:
        """y (M, N) += self(x), in place; returns y."""
        acc, sx = self._int_mm(x)
        if _w8a8_kernels(y):
            torch.ops.chatterbox_fast.dequant_rows_acc_(y, acc, sx, self.scale, self.bias)
            return y
        return y.add_(self._dequant(acc, sx))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "weight=int8 per-channel, activations=int8 per-row (dynamic)")


class Bf16GemmLinear(nn.Module):
    """y = x W^T + b as a bf16 GEMM (bf16 weights AND activations, fp32 accumulation inside the GEMM, bf16 output):
    the opt-in bf16 linears of S3Gen's CFM estimator on CPUs with native bf16 (`cpu_has_fast_bf16`: AMX / oneDNN).

    W is stored transposed, (K, N) contiguous, the layout ATen's `mm` hands oneDNN without a copy; the bias in bf16
    for `forward` (one `addmm`) and in fp32 for `forward_acc_`. Each activation row is rounded to bf16 (relative
    2^-9) and so is each output; unlike T3's weight-only `Bf16Linear` this changes the activations, so it is used
    only on request (`s3gen_quantize="bf16"`, or `use_mixed_precision=True` on such a CPU) and its drift is measured
    (BENCHMARKS.md).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("bias_bf16", torch.zeros(out_features, dtype=torch.bfloat16, device=device)
                             if bias else None)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> "Bf16GemmLinear":
        """From a float (N, K) weight and optional (N,) bias (copied: the module holds no view of them)."""
        mod = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        mod.weight_t = weight.detach().t().to(torch.bfloat16).contiguous()
        if bias is not None:
            mod.bias = bias.detach().float().clone()
            mod.bias_bf16 = bias.detach().to(torch.bfloat16).clone()
        return mod

    def _input(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Bf16GemmLinear expects (M, {self.in_features}) float32 or bfloat16 input, got "
                             f"{tuple(x.shape)} {x.dtype}")
        return x.to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        """x (M, K) float32 or bfloat16 -> (M, N) bfloat16."""
        x = self._input(x)
        if self.bias_bf16 is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias_bf16, x, self.weight_t)

    def forward_acc_(self, y: Tensor, x: Tensor, bias: bool = True) -> Tensor:
        """y (M, N) float32 += x W^T (+ b unless bias=False: the caller adds it later), in place; returns y."""
        y.add_(torch.mm(self._input(x), self.weight_t))
        return y if self.bias is None or not bias else y.add_(self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "weight=bf16, activations=bf16")


def check_s3gen_quantize_mode(mode: str | None) -> str | None:
    """None (exact fp32 S3Gen) or one of S3GEN_QUANT_MODES; anything else raises ValueError."""
    return _check_mode("s3gen_quantize", mode, S3GEN_QUANT_MODES)


def check_int8_attention_supported(mode: str | None) -> None:
    """"int8-attn" needs the AVX512-VNNI attention kernel (`kernels.int8_attention_ready()`): a clear ValueError
    otherwise (elsewhere only a portable loop exists, many times slower than the fp32 attention it would replace)."""
    if mode == "int8-attn" and not (cpu_kernels.load() and cpu_kernels.int8_attention_ready()):
        why = cpu_kernels.error() or f"the kernels' build is {cpu_kernels.isa()!r} or this CPU lacks AVX512-VNNI"
        raise ValueError(f"s3gen_quantize='int8-attn' needs a CPU with AVX512-VNNI and our AVX-512 kernels ({why}); "
                         "use s3gen_quantize='int8' (int8 GEMMs, fp32 attention) here")


def quantize_s3gen(s3gen: nn.Module, mode: str = "int8", release=None) -> nn.Module:
    """Opt-in int8 GEMMs for S3Gen's CFM estimator (CPU): every transformer block of the estimator gets W8A8Linear
    copies of its q/k/v (stacked into one GEMM), output and feed-forward linears (`BasicTransformerBlock.int8`),
    which its in-place inference forward then uses on a CPU. Those linears are ~57 % of the estimator's FLOPs; the
    rest (attention, convolutions, norms) stays fp32. This CHANGES THE OUTPUT (drift measured in BENCHMARKS.md).

    mode "bf16" gives the blocks Bf16GemmLinear copies instead (`BasicTransformerBlock.bf16`: bf16 GEMMs) and runs
    their attention on bf16 q / k / v (SDPA's CPU flash kernel, fp32 softmax); the residual stream, the norms, the
    convolutions and the rest stay fp32. Fast on CPUs with native bf16 (`cpu_has_fast_bf16`: AMX or AVX512-BF16),
    slower than fp32 elsewhere. Converting between "bf16" and the int8 modes replaces one form by the other.

    mode "int8-attn" also runs the attention on int8 dot products (`chatterbox_fast::full_attention_int8`: int8
    queries and centred keys for the scores, fp32 softmax rounded to u8 probability levels, centred int8 values for
    P V); AVX512-VNNI CPUs only (ValueError elsewhere). Converting an "int8" model to "int8-attn" (or back) only
    switches the attention.

    `s3gen`: an S3Gen or anything holding the estimator's BasicTransformerBlocks; in place; returns it. Converting
    twice is a no-op. `release`: called with each float weight now shadowed by an int8 copy (the engine passes
    `memory.release_file_pages`, so the memory-mapped checkpoint pages of those weights leave RSS; they are read
    back from the file only if the float path runs, e.g. on another device or with autograd).
    """
    from .models.s3gen.estimator import BasicTransformerBlock

    if check_s3gen_quantize_mode(mode) is None:
        raise ValueError(f"quantize_s3gen needs a mode from {S3GEN_QUANT_MODES}, got None")
    blocks = [m for m in s3gen.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        raise TypeError(f"no estimator transformer blocks found in {type(s3gen).__name__}")
    if blocks[0].norm1.weight.device.type == "cpu":
        cpu_kernels.load()
    check_int8_attention_supported(mode)
    kind, attr, other = (Bf16GemmLinear, "bf16", "int8") if mode == "bf16" else (W8A8Linear, "int8", "bf16")
    with torch.no_grad():
        for blk in blocks:
            blk.int8_attention = mode == "int8-attn"
            setattr(blk, other, None)  # one low-precision form at a time
            if getattr(blk, attr) is not None:
                continue
            a, ff = blk.attn1, blk.ff
            lins = {"qkv": (torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]), None),
                    "out": (a.to_out[0].weight, a.to_out[0].bias),
                    "ff1": (ff.net[0].proj.weight, ff.net[0].proj.bias),
                    "ff2": (ff.net[2].weight, ff.net[2].bias)}
            setattr(blk, attr, nn.ModuleDict({k: kind.from_weight(w, b) for k, (w, b) in lins.items()}))
            if release is not None:
                for lin in (a.to_q, a.to_k, a.to_v, a.to_out[0], ff.net[0].proj, ff.net[2]):
                    release(lin.weight)
    return s3gen


def quantize_t3(model: T3, mode: str = "int8", release=None) -> T3:
    """Replace T3's per-layer Llama linears by Int8Linear ("int8") or Bf16Linear ("bf16", weight-only bf16 with fp32
    math), in place; returns the model. q/k/v and gate/up are fused first (one linear each, T3_INT8_TARGETS): the
    same per-output-channel numbers in fewer, longer weight streams (measured 1.09x on the decode step's int8
    linears, 2 threads).

    Each float weight is dropped as soon as its int8 copy exists (peak extra memory: one layer's temporaries), so
    once nothing else holds the loaded tensors, the resident T3 linear weights are int8 (+ scales). Converting an
    already converted model is a no-op (whatever its format). Call before compiling the decode step or capturing
    CUDA graphs. For a model on the CPU this also builds/loads the C++ kernels (kernels/, cached; ~15 s the first
    time on a machine), so that tracing later never has to.
    `release`: called with each replaced checkpoint weight (T3_LAYER_LINEARS) once its copy exists (the engine
    passes `memory.release_file_pages`, so a memory-mapped checkpoint's pages do not pile up during the conversion).
    """
    if check_quantize_mode(mode) is None:
        raise ValueError(f"quantize_t3 needs a mode from {QUANT_MODES}, got None")
    if not isinstance(model, T3):
        raise TypeError(f"model must be a T3, got {type(model).__name__}")
    if model.speech_head.weight.device.type == "cpu":
        cpu_kernels.load()
    with torch.no_grad():
        for layer in model.tfmr.layers:
            for parent, parts in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj"))):
                if not all(isinstance(getattr(parent, n, None), nn.Linear) for n in parts):
                    continue  # already fused (or converted)
                originals = [getattr(parent, n).weight for n in parts]
                parent.fuse()  # one float linear of the concatenated weights; the separate ones are dropped
                if release is not None:
                    for w in originals:
                        release(w)
                del originals
            for path in T3_INT8_TARGETS:
                parent_name, name = path.split(".")
                parent = getattr(layer, parent_name)
                lin = getattr(parent, name)
                if not isinstance(lin, nn.Linear):  # already converted (to this or the other format)
                    continue
                setattr(parent, name, _LINEAR_TYPES[mode].from_linear(lin))
                if release is not None and path in T3_LAYER_LINEARS:  # a checkpoint weight (the fused ones are ours)
                    release(lin.weight)
                del lin
    return model


def pack_t3(model: T3) -> int:
    """Pack every Int8Linear / Bf16Linear of T3's layers for the CPU decode kernel (`pack_()`), in place; returns
    how many were packed. The engine does this when it decodes through the fused CPU step (generation/fused.py)."""
    return sum(m.pack_() for m in model.tfmr.layers.modules() if isinstance(m, (Int8Linear, Bf16Linear)))


def _buffer_bytes(model: nn.Module, types: tuple[type, ...]) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, types) for b in m.buffers())


def low_precision_linear_bytes(model: nn.Module) -> int:
    """Bytes held by the Int8Linear and Bf16Linear modules of `model` (weights + scales)."""
    return _buffer_bytes(model, (Int8Linear, Bf16Linear))


def int8_linear_bytes(model: nn.Module) -> int:
    """Bytes held by the Int8Linear modules of `model` (int8 weights + both scale copies)."""
    return _buffer_bytes(model, (Int8Linear,))
