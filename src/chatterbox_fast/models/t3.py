"""T3: a Llama backbone fed with custom text/speech embeddings, plus the conditioning encoder (spec §2).

Module names mirror the keys of `t3_cfg.safetensors`, so the key map is the identity (T3_KEYMAP).
The backbone runs on a preallocated static KV cache (`setup_caches`); `forward_hidden(x, input_pos, kv_len)` has
static shapes for a given (batch, S, kv_len) so that the one-token decode step can be compiled and CUDA-graphed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels as cpu_kernels
from ..config import T3Config
from ..generation.kv_cache import KVCache
from ..weights import KeyMap, embedding
from .t3_cond import T3CondEnc

# Every key of t3_cfg.safetensors maps 1:1 onto our modules; nothing is dropped.
T3_KEYMAP = KeyMap()


def llama3_inv_freq(cfg: T3Config, device=None) -> Tensor:
    """RoPE inverse frequencies with llama3 scaling, computed as transformers does (fp32)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    low_wavelen = cfg.rope_original_max_pos / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_pos / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (cfg.rope_original_max_pos / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * inv_l / cfg.rope_factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_l)


def rope_table(cfg: T3Config, max_seq: int, device=None) -> Tensor:
    """(max_seq, head_dim, 2) fp32 table of (cos, sin) for absolute positions 0..max_seq-1."""
    inv = llama3_inv_freq(cfg, device)
    pos = torch.arange(max_seq, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
    return torch.stack((emb.cos(), emb.sin()), dim=-1)


def apply_rope(x: Tensor, cs: Tensor) -> Tensor:
    """x (B, H, S, hd), cs (S, hd, 2): rotate-half RoPE (HF Llama convention)."""
    cos, sin = cs[..., 0].to(x.dtype), cs[..., 1].to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _cpu_decode_attention(q: Tensor) -> bool:
    """Our single-query CPU attention (kernels/cpu_linear.cpp) applies: fp32 on CPU, no autograd, kernel built."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_grad_enabled()
            and cpu_kernels.decode_attention_ready())


class Attention(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.k_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.v_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): q, k, v as one GEMM
        self.kv_cache: KVCache | None = None

    def fuse(self) -> None:
        """Replace q/k/v_proj by one (3 inner, D) projection: one GEMM launch instead of three (a runtime
        transform for the GPU decode step and before quantize_t3; the module then no longer has the checkpoint's
        key names)."""
        if self.qkv_proj is not None:
            return
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no random init of a copy
        self.qkv_proj.weight = nn.Parameter(w, requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, cs: Tensor, input_pos: Tensor, mask: Tensor | None, kv_len: int) -> Tensor:
        """x (B, S, D); cs (S, hd, 2); mask (S, kv_len) bool or None for a causal prefill from position 0."""
        B, S, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).view(B, S, 3 * self.n_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        else:
            q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
            k = self.k_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cs), apply_rope(k, cs)
        if self.kv_cache is not None:
            self.kv_cache.update(input_pos, k, v)
        if mask is None:  # prefill from position 0: attend to the fresh keys only
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif S == 1 and _cpu_decode_attention(q) and not self.kv_cache.quantized:  # reads only slots <= input_pos
            y = torch.ops.chatterbox_fast.decode_attention(q, self.kv_cache.k_cache, self.kv_cache.v_cache, input_pos,
                                                           self.head_dim ** -0.5)  # (B, nh, 1, hd)
        else:  # read only the first kv_len cache slots (a static bucket >= the filled length)
            kc, vc = self.kv_cache.read(kv_len, q.dtype)  # (views unless the cache is narrower)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Replace gate/up_proj by one (2 I, D) projection (see Attention.fuse)."""
        if self.gate_up_proj is not None:
            return
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        self.gate_up_proj.weight = nn.Parameter(w, requires_grad=False)
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, cs: Tensor, input_pos: Tensor, mask: Tensor | None, kv_len: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cs, input_pos, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The `tfmr.*` backbone. `embed_tokens` is a dummy table kept only because the checkpoint has it."""

    def __init__(self, cfg: T3Config):
        super().__init__()
        self.embed_tokens = embedding(cfg.llama_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class LearnedPositionEmbeddings(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.emb = embedding(n, dim)


class T3(nn.Module):
    def __init__(self, cfg: T3Config = T3Config()):
        super().__init__()
        self.cfg = cfg
        self.tfmr = Llama(cfg)
        self.cond_enc = T3CondEnc(cfg)
        self.text_emb = embedding(cfg.text_vocab_size, cfg.dim)
        self.speech_emb = embedding(cfg.speech_vocab_size, cfg.dim)
        self.text_pos_emb = LearnedPositionEmbeddings(cfg.text_pos_size, cfg.dim)
        self.speech_pos_emb = LearnedPositionEmbeddings(cfg.speech_pos_size, cfg.dim)
        self.text_head = nn.Linear(cfg.dim, cfg.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(cfg.dim, cfg.speech_vocab_size, bias=False)
        self.max_batch = 0
        self.max_seq = 0
        # KV cache dtype; None: the weights' dtype. The CPU engine's low-precision modes store it in bf16 (our decode
        # attention widens the rows in registers: half the step's cache bytes, fp32 math); torch.int8: per-row int8
        # with fp32 scales (opt-in, kv_cache="int8": a quarter of the bytes)
        self.kv_dtype: torch.dtype | None = None
        self._kv_tensors: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None  # kv_cache_tensors()

    def fuse_projections(self, release=None) -> None:
        """q/k/v and gate/up as single GEMMs in every layer (fewer kernel launches per decode step; same math, the
        GEMM kernels may round differently). A runtime transform: the model can no longer be saved in the
        checkpoint's layout. quantize_t3 fuses the layers itself before converting them. `release`: called with each
        replaced weight once its layer is fused (the engine drops a memory-mapped checkpoint's pages with it)."""
        for layer in self.tfmr.layers:
            for part, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                (layer.mlp, ("gate_proj", "up_proj"))):
                originals = [getattr(part, n).weight for n in names if hasattr(part, n)]
                part.fuse()
                if release is not None:
                    for w in originals:
                        release(w)

    # ---- caches -------------------------------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_seq: int, zero: bool = True) -> None:
        """Allocate the static KV cache and the RoPE table (no-op if the current ones are large enough). After
        `release_caches` the cache comes back at its previous size (same shapes: compiled graphs stay valid).
        zero=False: the slots are left uninitialised (KVCache), for readers that read written slots only; a cache
        allocated so is reallocated when a later call asks for zeros."""
        w = self.speech_emb.weight  # the activations' dtype and device (the head may be an int8 module: a draft's)
        dtype = self.kv_dtype or w.dtype
        fits = max_batch == self.max_batch and max_seq <= self.max_seq
        if (fits and self.caches_allocated and self.tfmr.layers[0].self_attn.kv_cache.k_cache.dtype == dtype
                and (self.caches_zeroed or not zero)):
            return
        max_seq = self.max_seq if fits else max_seq
        # normal tensors even when called under inference mode (generate_tokens): compiled graphs guard on the
        # dispatch keys of their inputs, so a cache re-created in another mode would compile them again
        with torch.inference_mode(False):
            for layer in self.tfmr.layers:
                layer.self_attn.kv_cache = KVCache(max_batch, self.cfg.n_heads, max_seq, self.cfg.head_dim,
                                                   dtype, w.device, zero=zero)
            if not fits:
                self.register_buffer("rope", rope_table(self.cfg, max_seq, w.device), persistent=False)
        self.max_batch, self.max_seq = max_batch, max_seq
        self._kv_tensors = None

    @property
    def caches_allocated(self) -> bool:
        return self.tfmr.layers[0].self_attn.kv_cache is not None

    @property
    def caches_zeroed(self) -> bool:
        """The cache was allocated zeroed (its unwritten slots read as 0)."""
        return self.caches_allocated and self.tfmr.layers[0].self_attn.kv_cache.zeroed

    def release_caches(self) -> None:
        """Free the KV cache between generations (2 x 30 layers x batch x max_seq x 1024 floats: 0.7 GB for the
        engine's 1408 positions in fp32), keeping its size for the next `setup_caches`. Every generation overwrites
        the slots it reads (prefill, then one slot per step), so a fresh cache changes no output."""
        for layer in self.tfmr.layers:
            layer.self_attn.kv_cache = None
        self._kv_tensors = None

    def kv_cache_tensors(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """([k_cache of every layer], [v_cache of every layer], [k_scale, v_scale of every layer] for an int8 cache,
        else []), the fused CPU decode step's arguments; built once per allocation (the nn.Module lookups take
        ~0.2 ms, per token otherwise). Call after setup_caches."""
        if self._kv_tensors is None:
            caches = [layer.self_attn.kv_cache for layer in self.tfmr.layers]
            if any(c is None for c in caches):
                raise RuntimeError("no KV cache: call setup_caches first")
            scales = [s for c in caches if c.quantized for s in (c.k_scale, c.v_scale)]
            self._kv_tensors = ([c.k_cache for c in caches], [c.v_cache for c in caches], scales)
        return self._kv_tensors

    # ---- embeddings ---------------------------------------------------------------------------------------
    def cond_embeds(self, speaker_emb: Tensor, prompt_tokens: Tensor | None, exaggeration: Tensor) -> Tensor:
        """speaker_emb (1, 256), prompt_tokens (1, P) long, exaggeration (1,) -> (1, 34, D)."""
        if prompt_tokens is None or prompt_tokens.shape[1] == 0:
            raise ValueError("T3 needs speech-prompt tokens (the built-in voice or a reference clip)")
        P = prompt_tokens.shape[1]
        prompt = self.speech_emb(prompt_tokens) + self.speech_pos_emb.emb.weight[:P]  # positions restart at 0
        return self.cond_enc(speaker_emb, prompt, exaggeration)

    def prefill_embeds(self, cond: Tensor, text_ids: Tensor, cfg_batch: bool) -> Tensor:
        """cond (1, 34, D), text_ids (1, L) with SOT/EOT -> (B, 34 + L + 2, D), B = 2 with CFG.

        Layout per row: [cond | text | BOS | BOS]: the BOS appears twice, both at learned position 0 (spec §10.1).
        The CFG unconditional row (row 1) zeroes the text *token* embeddings, keeping their positions.
        """
        L = text_ids.shape[1]
        text_pos = self.text_pos_emb.emb.weight[:L]
        text = self.text_emb(text_ids) + text_pos  # (1, L, D)
        bos = self.speech_emb.weight[self.cfg.start_speech] + self.speech_pos_emb.emb.weight[0]  # (D,)
        bos = bos.view(1, 1, -1).expand(1, 2, -1)
        row = torch.cat((cond, text, bos), dim=1)
        if not cfg_batch:
            return row
        uncond_text = text_pos.unsqueeze(0).expand_as(text)
        uncond = torch.cat((cond, uncond_text, bos), dim=1)
        return torch.cat((row, uncond), dim=0)

    def speech_embed(self, token: Tensor, speech_pos: Tensor, batch: int) -> Tensor:
        """token (1,) long, speech_pos (1,) long -> (batch, 1, D) embedding for one decode step."""
        e = self.speech_emb(token) + self.speech_pos_emb.emb(speech_pos)  # (1, D)
        return e.view(1, 1, -1).expand(batch, 1, -1)

    # ---- backbone -----------------------------------------------------------------------------------------
    def forward_hidden(self, x: Tensor, input_pos: Tensor, kv_len: int | None = None) -> Tensor:
        """x (B, S, D) at absolute positions input_pos (S,) -> final-normed hidden states (B, S, D).

        kv_len None: causal prefill starting at position 0. Otherwise attention over the first kv_len cache
        slots with a mask keeping slots <= each query's position.
        """
        cs = self.rope[input_pos]  # (S, hd, 2)
        mask = None
        if kv_len is not None:
            mask = torch.arange(kv_len, device=x.device)[None, :] <= input_pos[:, None]  # (S, kv_len)
        else:
            kv_len = x.shape[1]
        for layer in self.tfmr.layers:
            x = layer(x, cs, input_pos, mask, kv_len)
        return self.tfmr.norm(x)

    def speech_logits(self, hidden_last: Tensor) -> Tensor:
        """(B, D) -> (B, speech_vocab) fp32."""
        return self.speech_head(hidden_last).float()
