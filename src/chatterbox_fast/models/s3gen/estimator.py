"""The CFM velocity estimator of S3Gen: a 1-D U-Net with transformer blocks (`ConditionalDecoder`, spec §3.6).

Input: x, mu, speaker vector (broadcast over time) and prompt-mel condition, 80 channels each (320 in all), plus
the flow time t. Output: the velocity, 80 channels. One "down" stage (no actual downsampling), 12 mid stages and
one "up" stage; each is a causal ResNet block followed by 4 transformer blocks (full attention, padding mask only).
Convolutions are causal (left padding). Attribute names mirror the keys under `flow.decoder.estimator.`.

Layout: internally everything runs time-major, (B, T, C), so LayerNorm over channels, the transformer blocks and
the convolutions (as one im2col GEMM each) need no transposes. `forward` keeps the reference's (B, C, T) signature;
the solver calls `forward_packed` on a preallocated (B, T, 320) input and precomputed time embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels as cpu_kernels

__all__ = ["EstimatorConfig", "ConditionalDecoder", "sinusoidal_time_embedding"]


@dataclass(frozen=True)
class EstimatorConfig:
    n_feats: int = 80  # mel bins: x, mu, spks and cond are 80 channels each
    in_channels: int = 320  # 4 * n_feats, concatenated as [x, mu, spks, cond]
    channels: int = 256  # U-Net width (one level: channels=[256] in the reference)
    n_blocks: int = 4  # transformer blocks per stage
    num_mid_blocks: int = 12
    num_heads: int = 8
    head_dim: int = 64  # attention inner width 8 * 64 = 512
    ff_mult: int = 4  # GELU feed-forward 256 -> 1024 -> 256
    time_embed_dim: int = 1024  # 4 * channels
    time_scale: float = 1000.0  # sinusoidal embedding of 1000 * t
    mask_bias: float = -1.0e10  # additive attention bias on padded keys (reference value)


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) times -> (B, dim): [sin(scale t f_k), cos(scale t f_k)], f_k = exp(-k ln(1e4) / (dim/2 - 1))."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))  # (half,)
    arg = scale * t.reshape(-1, 1) * freq.unsqueeze(0)  # (B, half), same operation order as the reference
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


# Up to this batch a k-tap conv runs as k shifted GEMMs per row (no im2col copy); above it one im2col GEMM.
_SHIFTED_CONV_MAX_BATCH = 8


class CausalConv1d(nn.Module):
    """Conv1d (weight (O, I, k), stride 1) with k-1 zeros of left padding, applied to time-major (B, T, I) input.

    Computed as k GEMMs on shifted views of the input (the earlier taps accumulated in place, beta = 1), so no
    padded or unfolded copy is made; for a large batch, one im2col GEMM instead (the (O, I, k) weight viewed as
    (O, I*k) matches the unfolded (T, I, k) layout). k = 1 is a plain pointwise Conv1d (`res_conv`, `final_proj`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        if k == 1:
            return F.linear(x, self.weight.squeeze(-1), self.bias)
        b, t, c = x.shape
        if b > _SHIFTED_CONV_MAX_BATCH or t < k:
            cols = F.pad(x, (0, 0, k - 1, 0)).unfold(1, k, 1)  # (B, T, I, k) view
            return F.linear(cols.reshape(b, t, c * k), self.weight.reshape(self.weight.shape[0], -1), self.bias)
        # Shifted GEMMs, no im2col copy: y[t] = b + W[..., k-1] x[t] + sum_{j<k-1} W[..., j] x[t - (k-1) + j],
        # each earlier tap accumulated in place (beta = 1) into the frames it reaches; frames before 0 are the zeros
        # of the causal padding, so they simply contribute nothing.
        y = F.linear(x, self.weight[:, :, k - 1], self.bias)  # (B, T, O), current-frame tap + bias
        for j in range(k - 1):
            shift = k - 1 - j
            wt = self.weight[:, :, j].t()  # (I, O) view
            for i in range(b):
                y[i, shift:].addmm_(x[i, : t - shift], wt)
        return y

    def tap_major_(self) -> torch.Tensor | None:
        """Store the weight tap-major: the same (O, I, k) tensor and values, laid out as (k, O, I) in memory, so each
        tap's (O, I) matrix is contiguous and the shifted GEMMs read it in place (with the checkpoint's layout
        every tap is a strided view that the GEMM first copies). Returns the replaced tensor, or None if there was
        nothing to do (k = 1, or already tap-major)."""
        w = self.weight
        if self.kernel_size == 1 or w[:, :, 0].is_contiguous():
            return None
        old = w.data
        w.data = old.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # strides (I, 1, O*I)
        return old


def _apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def mish_(x: torch.Tensor) -> torch.Tensor:
    """In-place Mish, x * tanh(log1p(exp(x))): ATen's own Mish formula (same vectorised exp/log1p/tanh, so equal
    to F.mish to 1 ulp), as four in-place passes; measured ~2x faster than F.mish on a 2-core AVX-512 CPU."""
    y = torch.exp(x)
    y.log1p_().tanh_()
    return x.mul_(y)


def _cpu_elementwise(x: torch.Tensor) -> bool:
    """Our fused CPU LayerNorm / Mish / GELU passes apply: contiguous fp32 on CPU, no autograd, kernels built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.is_contiguous() and cpu_kernels.elementwise_ready())


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm, add: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x + add) for inference; `add` (C,) or None is added into x IN PLACE first (x then holds x + add)."""
    if _cpu_elementwise(x):
        return torch.ops.chatterbox_fast.layer_norm_fused(x, add, norm.weight, norm.bias, norm.eps, False)
    return norm(x if add is None else x.add_(add))


class CausalBlock1D(nn.Module):
    """Mish(LayerNorm_C(CausalConv1d_k3(x * m))) * m.

    Keys `block.0` (conv) and `block.2` (LayerNorm) mirror the reference Sequential(conv, transpose, LN, transpose,
    Mish); the transposes and the Mish hold no weights, hence the ModuleDict with only those two indices.
    """

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.ModuleDict({"0": CausalConv1d(dim, dim_out, 3), "2": nn.LayerNorm(dim_out)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.block["0"](_apply_mask(x, mask))
        norm = self.block["2"]
        if _cpu_elementwise(y):  # LayerNorm and Mish in one pass
            y = torch.ops.chatterbox_fast.layer_norm_fused(y, None, norm.weight, norm.bias, norm.eps, True)
            return y if mask is None else y.mul_(mask)
        y = norm(y)
        if torch.is_grad_enabled():  # autograd needs the out-of-place ops
            return F.mish(y) if mask is None else F.mish(y) * mask
        y = mish_(y)
        return y if mask is None else y.mul_(mask)


class CausalResnetBlock1D(nn.Module):
    """block2(block1(x) + Linear(Mish(t_emb))) + res_conv(x * m)."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = CausalConv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask).add_(self.mlp(t_emb).unsqueeze(1))  # (B, T, C) + (B, 1, C)
        h = self.block2(h, mask)
        return h.add_(self.res_conv(_apply_mask(x, mask)))


def _cpu_full_attention(x: torch.Tensor, head_dim: int) -> bool:
    """Our CPU estimator attention applies: fp32 on CPU, no autograd, head size 64, AVX-512 / AVX2 kernel built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and head_dim == 64 and not torch.is_grad_enabled()
            and cpu_kernels.full_attention_ready())


class Attention(nn.Module):
    """Self-attention, q/k/v without bias, SDPA with scale 1/sqrt(head_dim); `to_out.0` is the output Linear."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_qkv_ (a plain attribute: not in the state_dict)

    def fuse_qkv_(self) -> list[torch.Tensor]:
        """Keep q, k and v's weights in one (3 H*hd, C) tensor, so inference runs one GEMM instead of three. The
        three parameters become row views of it: same key names, values and state_dict (whose three tensors then
        share storage: clone them before a safetensors save); a load_state_dict copies into it. Returns the
        replaced tensors (empty if already fused). Moving the module to another device or dtype gives the
        parameters new storage; the fused GEMM then no longer applies and `attend` uses the three."""
        if self._fused_qkv_weight() is not None:
            return []
        lins = (self.to_q, self.to_k, self.to_v)
        old = [lin.weight.data for lin in lins]
        w = torch.cat(old)  # (3 H*hd, C)
        n = self.heads * self.head_dim
        for i, lin in enumerate(lins):
            lin.weight.data = w[i * n:(i + 1) * n]
        self.qkv_weight = w
        return old

    def _fused_qkv_weight(self) -> torch.Tensor | None:
        """The fused weight while the three parameters are still its row views, else None."""
        w = self.qkv_weight
        if w is None:
            return None
        step = w.stride(0) * w.element_size() * self.heads * self.head_dim
        ptrs = (self.to_q.weight.data_ptr(), self.to_k.weight.data_ptr(), self.to_v.weight.data_ptr())
        return w if ptrs == (w.data_ptr(), w.data_ptr() + step, w.data_ptr() + 2 * step) else None

    def attend(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) -> (B, T, H*hd) attention output before `to_out`."""
        b, t, _ = x.shape
        w = None if torch.is_grad_enabled() else self._fused_qkv_weight()
        if w is not None:  # one GEMM; q, k and v are views of its (B, T, 3, H, hd) output
            qkv = F.linear(x, w).view(b, t, 3, self.heads, self.head_dim)
            return self.attend_qkv(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attn_bias)
        q, k, v = (lin(x).view(b, t, self.heads, self.head_dim) for lin in (self.to_q, self.to_k, self.to_v))
        return self.attend_qkv(q, k, v, attn_bias)

    def attend_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_bias: torch.Tensor | None, int8: bool = False) -> torch.Tensor:
        """q, k, v (B, T, H, hd) views with a contiguous last dim -> (B, T, H*hd). `int8` (the opt-in
        s3gen_quantize="int8-attn"; CPU, unmasked, AVX512-VNNI kernel loaded): Q K^T and P V as int8 dot products
        (kernels/cpu_linear.cpp, `full_attention_int8`)."""
        b, t = q.shape[:2]
        if int8 and attn_bias is None and _cpu_full_attention(q, self.head_dim) \
                and cpu_kernels.int8_attention_ready():
            y = torch.ops.chatterbox_fast.full_attention_int8(q, k, v, 1.0 / math.sqrt(self.head_dim))
            return y.view(b, t, self.heads * self.head_dim)
        if attn_bias is None and _cpu_full_attention(q, self.head_dim):
            # our CPU kernel (kernels/cpu_linear.cpp) reads the (B, T, H, hd) views directly and writes (B, T, H, hd)
            y = torch.ops.chatterbox_fast.full_attention(q, k, v, 1.0 / math.sqrt(self.head_dim))
            return y.view(b, t, self.heads * self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0 / math.sqrt(self.head_dim))
        return y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)  # a view: SDPA's output is (B, T, H, hd)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        return self.to_out[0](self.attend(x, attn_bias))


class GELUProj(nn.Module):
    """Linear followed by exact GELU (`ff.net.0.proj`)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x)) if torch.is_grad_enabled() else torch.ops.aten.gelu_(self.proj(x))


class FeedForward(nn.Module):
    """`net.0` GELU projection, `net.1` (dropout in the reference: identity), `net.2` output Linear."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """x += Attn(LN1(x)); x += FF(LN3(x)) (diffusers layout, no cross-attention, so there is no norm2).

    `int8` (opt-in, set by `quantize.quantize_s3gen`): None, or a ModuleDict of int8 GEMM linears `qkv` (the q, k
    and v weights stacked), `out`, `ff1`, `ff2` that `forward_` uses on a CPU instead of the float ones; each maps
    (M, K) -> (M, N) and has `forward_acc_(y, x)` for y += linear(x). The float weights stay (other devices, autograd).
    `bf16` (opt-in, `quantize_s3gen(..., "bf16")`): None, or the same four linears as bf16 GEMMs
    (`quantize.Bf16GemmLinear`, bf16 outputs); `forward_` then runs the attention on bf16 q / k / v too.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)
        self.int8: nn.ModuleDict | None = None
        self.int8_attention = False  # with int8: the attention on int8 dot products ("int8-attn")
        self.bf16: nn.ModuleDict | None = None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), attn_bias)
        return x + self.ff(self.norm3(x))

    def forward_(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        """`forward` IN PLACE on a contiguous x (inference only): each residual add rides in its output
        projection's GEMM (beta = 1 into x), then the bias is added in place. No (B, T, C) tensor is allocated
        for the residual stream."""
        if self.int8 is not None and x.device.type == "cpu":
            return self._forward_int8_(x, attn_bias)
        if self.bf16 is not None and x.device.type == "cpu":
            return self._forward_bf16_(x, attn_bias)
        c = x.shape[-1]
        y = x.view(-1, c)  # (B*T, C)
        out = self.attn1.to_out[0]
        y.addmm_(self.attn1.attend(_layer_norm(x, self.norm1), attn_bias).reshape(-1, out.in_features),
                 out.weight.t())
        h = _layer_norm(y, self.norm3, out.bias)  # adds to_out's bias into y first
        ff_in, ff_out = self.ff.net[0].proj, self.ff.net[2]
        if _cpu_elementwise(h):  # bias + GELU in one pass (F.linear would first copy the bias into every row)
            g = torch.mm(h, ff_in.weight.t())
            torch.ops.chatterbox_fast.bias_gelu_(g, ff_in.bias)
        else:
            g = self.ff.net[0](h)
        y.addmm_(g, ff_out.weight.t()).add_(ff_out.bias)
        return x

    def _forward_int8_(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        """`forward_` with the int8 GEMMs of `self.int8` (one GEMM for q, k and v; residuals added in place)."""
        b, t, c = x.shape
        a, q8 = self.attn1, self.int8
        y = x.view(-1, c)  # (B*T, C)
        qkv = q8["qkv"](_layer_norm(y, self.norm1)).view(b, t, 3, a.heads, a.head_dim)  # (B, T, 3, H, hd)
        o = a.attend_qkv(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attn_bias, self.int8_attention)  # (B, T, H*hd)
        q8["out"].forward_acc_(y, o.reshape(b * t, -1))
        h = q8["ff1"](_layer_norm(y, self.norm3))  # (B*T, ff inner)
        q8["ff2"].forward_acc_(y, torch.ops.aten.gelu_(h))
        return x

    def _forward_bf16_(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        """`forward_` with the bf16 GEMMs of `self.bf16`: LayerNorm in fp32, its output rounded to bf16 for the
        GEMMs, attention on the bf16 q / k / v (our AMX kernel `full_attention_bf16` where it runs, else SDPA: fp32
        scores and softmax, bf16 probabilities either way), GELU on the bf16 feed-forward activations; the residual
        stream x stays fp32 (updated in place)."""
        b, t, c = x.shape
        a, lin = self.attn1, self.bf16
        y = x.view(-1, c)  # (B*T, C) fp32
        qkv = lin["qkv"](_layer_norm(y, self.norm1)).view(b, t, 3, a.heads, a.head_dim)  # (B, T, 3, H, hd) bf16
        scale = 1.0 / math.sqrt(a.head_dim)
        if attn_bias is None and a.head_dim == 64 and cpu_kernels.bf16_attention_ready():  # AMX tiles
            o = torch.ops.chatterbox_fast.full_attention_bf16(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale)
            o = o.view(b * t, -1)  # (B*T, H*hd) bf16
        else:
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, hd) views
            bias = None if attn_bias is None else attn_bias.to(torch.bfloat16)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, H, T, hd)
            o = o.transpose(1, 2).reshape(b * t, -1)
        lin["out"].forward_acc_(y, o, bias=False)  # its bias: added in the norm below
        g = lin["ff1"](_layer_norm(y, self.norm3, lin["out"].bias))  # (B*T, ff inner) bf16
        lin["ff2"].forward_acc_(y, torch.ops.aten.gelu_(g))
        return x


class TimestepEmbedding(nn.Module):
    """linear_2(SiLU(linear_1(emb)))."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _run_block(block: BasicTransformerBlock, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
    return block(x, attn_bias)


def _run_block_(block: BasicTransformerBlock, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
    return block.forward_(x, attn_bias)


def _transformer_stack(cfg: EstimatorConfig) -> nn.ModuleList:
    return nn.ModuleList(
        BasicTransformerBlock(cfg.channels, cfg.num_heads, cfg.head_dim, cfg.ff_mult) for _ in range(cfg.n_blocks)
    )


class ConditionalDecoder(nn.Module):
    """The estimator. No buffers: safe to build on the meta device."""

    def __init__(self, cfg: EstimatorConfig = EstimatorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        c, te = cfg.channels, cfg.time_embed_dim
        self.time_mlp = TimestepEmbedding(cfg.in_channels, te)
        # [resnet, transformer blocks, conv]: the reference's downsample/upsample are plain causal convs here.
        self.down_blocks = nn.ModuleList(
            [nn.ModuleList([CausalResnetBlock1D(cfg.in_channels, c, te), _transformer_stack(cfg),
                            CausalConv1d(c, c, 3)])]
        )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(c, c, te), _transformer_stack(cfg)]) for _ in range(cfg.num_mid_blocks)
        )
        self.up_blocks = nn.ModuleList(
            [nn.ModuleList([CausalResnetBlock1D(2 * c, c, te), _transformer_stack(cfg), CausalConv1d(c, c, 3)])]
        )
        self.final_block = CausalBlock1D(c, c)
        self.final_proj = CausalConv1d(c, cfg.n_feats, 1)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) flow times in [0, 1] -> (B, time_embed_dim)."""
        emb = sinusoidal_time_embedding(t, self.cfg.in_channels, self.cfg.time_scale).to(t.dtype)
        return self.time_mlp(emb)

    def attn_bias(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T, 1) 0/1 frame mask -> (B, 1, 1, T) additive key bias (0 kept, -1e10 padded); None stays None."""
        if mask is None:
            return None
        return ((1.0 - mask) * self.cfg.mask_bias).transpose(1, 2).unsqueeze(1)

    def inference_layout_(self, fuse_qkv: bool = True) -> list[torch.Tensor]:
        """Re-lay the weights for fast inference, same values and state_dict keys: every causal conv tap-major
        (`CausalConv1d.tap_major_`) and, with `fuse_qkv`, each attention's q/k/v in one GEMM (`Attention.fuse_qkv_`).
        Returns the replaced weight tensors (a loader may drop their memory-mapped pages). Idempotent."""
        old: list[torch.Tensor] = []
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, CausalConv1d):
                    t = m.tap_major_()
                    old += [] if t is None else [t]
                elif isinstance(m, Attention) and fuse_qkv:
                    old += m.fuse_qkv_()
        return old

    def forward_packed(
        self,
        h: torch.Tensor,
        t_emb: torch.Tensor,
        mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h (B, T, 320) = [x, mu, spks, cond] time-major; t_emb (B, 1024); mask (B, T, 1) or None -> (B, T, 80).

        `attn_bias` is `self.attn_bias(mask)`; pass it to avoid rebuilding it on every call.
        """
        if mask is not None and attn_bias is None:
            attn_bias = self.attn_bias(mask)
        # Every x below is a fresh tensor owned here (never the caller's h), so the transformer blocks may update
        # it in place; `skip` is not written after it is taken.
        run = _run_block if torch.is_grad_enabled() else _run_block_
        (resnet, blocks, conv), = self.down_blocks
        x = resnet(h, mask, t_emb)
        for block in blocks:
            x = run(block, x, attn_bias)
        skip = x
        x = conv(_apply_mask(x, mask))

        for resnet, blocks in self.mid_blocks:
            x = resnet(x, mask, t_emb)
            for block in blocks:
                x = run(block, x, attn_bias)

        (resnet, blocks, conv), = self.up_blocks
        x = resnet(torch.cat([x, skip], dim=-1), mask, t_emb)  # (B, T, 2C): [x, skip] like the reference
        for block in blocks:
            x = run(block, x, attn_bias)
        x = conv(_apply_mask(x, mask))
        x = self.final_block(x, mask)
        return _apply_mask(self.final_proj(_apply_mask(x, mask)), mask)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Reference signature: x, mu, cond (B, 80, T); mask (B, 1, T) or None; t (B,); spks (B, 80) -> (B, 80, T)."""
        tlen = x.shape[-1]
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, tlen), cond], dim=1).transpose(1, 2)  # (B, T, 320)
        m = None if mask is None else mask.transpose(1, 2)  # (B, T, 1)
        return self.forward_packed(h, self.embed_time(t), m).transpose(1, 2)
