"""CPU decode step with T3's whole layer stack in one C++ call (`chatterbox_fast::decode_layers`, kernels/).

Decoding one token at batch 2 reads every weight once, so on a CPU the step is bound by weight bytes, and what is
left above that floor is per-op overhead: the module path (eager or inductor) issues ~15 ops per layer, 450 per
token, each going through the dispatcher or inductor's Python wrapper at a few microseconds, 8-10 ms per token on
the 2-core machine measured: a third of the int8 step. `decode_layers` runs the same math (the same linear and
attention kernels as the module path's Int8Linear / Bf16Linear / decode attention, the small ops as plain loops) in
one call; the speech embedding, the final norm and the sampler stay in PyTorch (a handful of ops), and an fp32
speech head runs on the layers' fp32 linear kernel (`chatterbox_fast::f32_linear`, whose rows do not depend on how
many rows share a call, unlike BLAS's: the speculative check's k tokens read the head once and match the step).
No compilation: nothing to warm up, and the same speed with `enable_compilation` off.

It applies to T3 on the CPU with fp32 activations, fused q/k/v and gate/up projections (`T3.fuse_projections`, which
`quantize_t3` does) and the C++ kernels built for AVX-512 or AVX2 (the portable build's plain loops would be slower
than ATen's kernels); `fused_step_unsupported(model)` says why not otherwise. Its numbers are those of the module
path up to fp32 summation order (RMSNorm's sum, FMA contraction in RoPE / SiLU): tests/generation/test_fused_step.py.

Bound to one model: it holds references to the layer weights taken at construction (quantising or fusing the model
afterwards needs a new step). The KV caches come from `T3.kv_cache_tensors()` on every call (rebuilt by the model
after `setup_caches` / `release_caches`), so the step never keeps a released cache alive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels as cpu_kernels
from ..models.t3 import T3
from .decode import DecodeState, choose
from .sampling import SamplingParams


def _linear_weight(mod: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(weight, int8 scales or an empty tensor) of a T3 layer linear, or None when the kernel cannot run it."""
    from ..quantize import Bf16Linear, Int8Linear

    empty = torch.empty(0)
    if isinstance(mod, Int8Linear):  # row-major (N, K) or packed (N / 8, K / 64, 8, 64): the kernel takes both
        w, s = mod.weight_int8, mod.scale
    elif isinstance(mod, Bf16Linear):
        w, s = mod.weight_bf16, empty
    elif type(mod) is nn.Linear and mod.bias is None and mod.weight.dtype == torch.float32:
        w, s = mod.weight, empty
    else:
        return None
    return (w, s) if w.is_contiguous() else None


def fused_step_unsupported(model: T3) -> str | None:
    """None when `FusedDecodeStep(model)` can run, else the reason (a sentence)."""
    if not isinstance(model, T3):
        return f"not a T3 ({type(model).__name__})"
    emb = model.speech_emb.weight  # the activations' dtype and device
    if emb.device.type != "cpu" or emb.dtype != torch.float32:
        return "the fused step runs T3 on the CPU with fp32 activations"
    if not cpu_kernels.available():
        return f"the C++ CPU kernels are not loaded ({cpu_kernels.error() or 'call kernels.load() first'})"
    if cpu_kernels.isa() not in ("avx512", "avx2"):
        return f"the fused step needs an AVX-512 or AVX2 build of the kernels (this one: {cpu_kernels.isa()})"
    for layer in model.tfmr.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            return "q/k/v and gate/up must be fused (T3.fuse_projections or quantize_t3)"
        for mod in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if _linear_weight(mod) is None:
                return (f"unsupported layer linear {type(mod).__name__} (int8, bf16 or bias-free fp32 expected, "
                        "contiguous)")
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(n.eps != model.cfg.norm_eps or n.weight.dtype != torch.float32 for n in norms):
            return "the layer norms must be fp32 with the config's eps"
    return None


def layer_weights(model: T3) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """decode_layers' weight arguments: per layer the qkv / o / gate_up / down weights (4 per layer), their int8
    scales (empty tensors for bf16 / fp32 weights) and the two RMSNorm weights. Call on a supported model."""
    weights, scales, norms = [], [], []
    for layer in model.tfmr.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for mod in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            w, s = _linear_weight(mod)
            weights.append(w.detach())
            scales.append(s.detach())
        norms += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
    return weights, scales, norms


class FusedDecodeStep:
    """`step(model, token, state, noise, params, kv_len) -> next token (1,)`, a drop-in `step_fn` for
    `generate_tokens`, with the layers in one `decode_layers` call (module docstring)."""

    reads_written_slots_only = True  # decode_layers attends over slots <= its position: caches need no zeroing

    def __init__(self, model: T3):
        reason = fused_step_unsupported(model)
        if reason is not None:
            raise ValueError(f"FusedDecodeStep: {reason}")
        self.model = model
        self.weights, self.scales, self.norms = layer_weights(model)
        # an fp32 speech head runs on the kernel of the fp32 layer linears (its result for a row does not depend on
        # how many rows go with it, unlike BLAS's): the k-token check reads the head's 33 MB once for all its rows
        # and still gets the one-token step's bits; other heads (the draft's int8 one) run as modules
        head = model.speech_head
        self.head_weight = (head.weight.detach() if type(head) is nn.Linear and head.bias is None and
                            head.weight.dtype == torch.float32 and head.weight.is_contiguous() else None)

    def step_logits(self, model: T3, token: Tensor, state: DecodeState, kv_len: int) -> Tensor:
        """As decode.step_logits: token (1,) at state's positions -> raw speech logits (B, V) fp32. kv_len is
        unused (the kernel reads the cache slots <= state.input_pos)."""
        if model is not self.model:
            raise ValueError("this fused step belongs to another T3 instance")
        B, D = state.batch, model.cfg.dim
        x = model.speech_embed(token, state.speech_pos, B).reshape(B, D).contiguous()  # (B, D)
        k_caches, v_caches, kv_scales = model.kv_cache_tensors()
        h = torch.ops.chatterbox_fast.decode_layers(x, self.weights, self.scales, self.norms, k_caches, v_caches,
                                                    kv_scales, model.rope, state.input_pos, model.cfg.norm_eps)
        return self._head(model, model.tfmr.norm(h))  # (B, V)

    def tokens_logits(self, model: T3, tokens: Tensor, state: DecodeState) -> Tensor:
        """Feed tokens (k,) at state's positions onwards in one call (k cache slots written, causal among them) ->
        raw speech logits (B, k, V) fp32, column j the logits after tokens[j]. Does not advance state. The weights
        are read once for all k tokens (the speculative decoder's verification, generation/speculative.py)."""
        if model is not self.model:
            raise ValueError("this fused step belongs to another T3 instance")
        k, B, D = tokens.shape[0], state.batch, model.cfg.dim
        steps = torch.arange(k, device=tokens.device)
        e = model.speech_emb(tokens) + model.speech_pos_emb.emb(state.speech_pos + steps)  # (k, D)
        x = e.unsqueeze(1).expand(k, B, D).contiguous()  # (k, B, D)
        k_caches, v_caches, kv_scales = model.kv_cache_tensors()
        h = torch.ops.chatterbox_fast.decode_layers(x, self.weights, self.scales, self.norms, k_caches, v_caches,
                                                    kv_scales, model.rope, state.input_pos, model.cfg.norm_eps)
        hn = model.tfmr.norm(h)  # (k, B, D)
        if self.head_weight is not None:  # all k B rows in one pass over the head (its kernel: the same bits per row)
            return self._head(model, hn.reshape(k * B, D)).view(k, B, -1).transpose(0, 1)  # (B, k, V)
        # else one token at a time: the same (B, D) GEMM as the one-token step (BLAS may sum a taller one in another
        # order), so each token's logits are bit-identical to the step's
        return torch.stack([model.speech_logits(hn[j]) for j in range(k)], dim=1)  # (B, k, V)

    def _head(self, model: T3, hn: Tensor) -> Tensor:
        """Normed hidden rows (M, D) -> speech logits (M, V) fp32."""
        if self.head_weight is None:
            return model.speech_logits(hn)
        return torch.ops.chatterbox_fast.f32_linear(hn.contiguous(), self.head_weight)

    def __call__(self, model: T3, token: Tensor, state: DecodeState, noise: Tensor, params: SamplingParams,
                 kv_len: int) -> Tensor:
        logits = self.step_logits(model, token, state, kv_len)
        nxt = choose(logits, state, noise, params)
        state.input_pos += 1
        state.speech_pos += 1
        return nxt
