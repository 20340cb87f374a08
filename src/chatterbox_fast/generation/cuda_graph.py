"""CUDA graphs for the two hot loops: T3's decode step and S3Gen's flow estimator.

Both loops launch many small kernels per step (T3: ~40 per layer x 30 layers per token; the CFM U-Net: thousands per
Euler step), so on a GPU they are bound by kernel-launch overhead, not by the GPU. Capturing a step once and
replaying it removes that overhead; the numbers do not change (the same kernels run on the same addresses).

- `CUDAGraphDecodeStep`: the whole `decode_one_token` (logits, processors, draw, state update) as one graph per
  (kv_len bucket, sampling params). The logits part can itself be a compiled function (inductor kernels are
  capturable), which fuses the ~40 kernels of a layer into a few.
- `GraphedEstimator`: the estimator's `forward_packed` as one graph per input shape (a few lengths kept, LRU),
  optionally under bf16 autocast. It stands in for the estimator inside `solve_euler_cfg`, which keeps its Python
  loop (a handful of launches per step around one replay).

Graphs read and write fixed buffers: inputs are copied into them before a replay and outputs are views of them, valid
until the next replay. Everything here is a no-op concept on CPU; callers only build these on CUDA.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.t3 import T3
from .decode import DecodeState, choose, step_logits
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

LogitsFn = Callable[[T3, Tensor, DecodeState, int], Tensor]


@dataclass
class _StaticDecode:
    token: Tensor  # (1,) long: the token fed to the step (the graph writes the drawn one back here)
    next: Tensor  # (1,) long: the token drawn by the last replay
    noise: Tensor  # (1, V) fp32 exponential noise for the draw
    state: DecodeState  # static input_pos / speech_pos / seen


class CUDAGraphDecodeStep:
    """`step(model, token, state, noise, params, kv_len) -> next token (1,)`, replayed from CUDA graphs.

    One graph per KV bucket and sampling setting (the processors' floats are baked into the graph; max_new_tokens is
    not part of the step, so it does not multiply graphs).

    The first call with a new `DecodeState` copies its tensors into the graph's static buffers and rebinds the
    state's fields to them, so the caller's state stays the one that is advanced. The returned tensor is a static
    buffer: read (copy) it before the next call, as `generate_tokens` does.
    """

    def __init__(self, model: T3, logits_fn: LogitsFn | None = None, warmup: int = 2):
        self.model = model
        self.logits_fn = logits_fn or step_logits
        self.warmup = warmup
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._static: _StaticDecode | None = None
        self._bound: DecodeState | None = None
        self._pool = None
        self._cache: tuple[int, int] | None = None
        self.fallback_reason: str | None = None

    # ---- static buffers -----------------------------------------------------------------------------------
    def _allocate(self, state: DecodeState) -> _StaticDecode:
        dev = state.seen.device
        st = DecodeState(input_pos=torch.zeros(1, dtype=torch.long, device=dev),
                         speech_pos=torch.zeros(1, dtype=torch.long, device=dev),
                         seen=torch.zeros_like(state.seen), batch=state.batch)
        V = state.seen.shape[1]
        return _StaticDecode(token=torch.zeros(1, dtype=torch.long, device=dev),
                             next=torch.zeros(1, dtype=torch.long, device=dev),
                             noise=torch.ones(1, V, dtype=torch.float32, device=dev), state=st)

    def _bind(self, state: DecodeState) -> _StaticDecode:
        s = self._static
        if s is None or s.state.batch != state.batch or s.state.seen.shape != state.seen.shape:
            s = self._static = self._allocate(state)
            self.graphs.clear()
        st = s.state
        st.input_pos.copy_(state.input_pos)
        st.speech_pos.copy_(state.speech_pos)
        st.seen.copy_(state.seen)
        state.input_pos, state.speech_pos, state.seen = st.input_pos, st.speech_pos, st.seen
        self._bound = state
        return s

    # ---- capture ------------------------------------------------------------------------------------------
    def _body(self, s: _StaticDecode, params: SamplingParams, kv_len: int) -> None:
        logits = self.logits_fn(self.model, s.token, s.state, kv_len)
        nxt = choose(logits, s.state, s.noise, params)
        s.state.input_pos += 1
        s.state.speech_pos += 1
        s.next.copy_(nxt)
        s.token.copy_(nxt)

    def _capture(self, s: _StaticDecode, params: SamplingParams, kv_len: int) -> torch.cuda.CUDAGraph:
        st = s.state
        saved = (st.input_pos.clone(), st.speech_pos.clone(), st.seen.clone(), s.token.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, cuBLAS handles) off the capture
            for _ in range(self.warmup):
                self._body(s, params, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        # Warm-up wrote KV-cache slots at and after the current position: each is rewritten by its own step
        # before any query can attend to it (the mask hides slots > position), so no output changes.
        st.input_pos.copy_(saved[0])
        st.speech_pos.copy_(saved[1])
        st.seen.copy_(saved[2])
        s.token.copy_(saved[3])
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            self._body(s, params, kv_len)
        return g

    # ---- call ---------------------------------------------------------------------------------------------
    def __call__(self, model: T3, token: Tensor, state: DecodeState, noise: Tensor, params: SamplingParams,
                 kv_len: int) -> Tensor:
        if model is not self.model:
            raise ValueError("this CUDA-graph step belongs to another T3 instance")
        s = self._static if state is self._bound else self._bind(state)
        if token is not s.next:  # after the first step the graph already wrote the drawn token into s.token
            s.token.copy_(token)
        s.noise.copy_(noise)
        cache = (model.rope.data_ptr(), model.tfmr.layers[0].self_attn.kv_cache.k_cache.data_ptr())
        if cache != self._cache:  # setup_caches reallocated: the old graphs point at freed memory
            self.graphs.clear()
            self._cache = cache
        key = (kv_len, params.temperature, params.cfg_weight, params.repetition_penalty, params.min_p, params.top_p)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture_or_fall_back(s, params, kv_len)
        g.replay()
        return s.next

    def _capture_or_fall_back(self, s: _StaticDecode, params: SamplingParams, kv_len: int):
        try:
            return self._capture(s, params, kv_len)
        except Exception as err:  # noqa: BLE001 - a compiled logits function that fails is replaced, once, loudly
            if self.logits_fn is step_logits:
                raise
            self.fallback_reason = (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:500]
            logger.warning("compiled T3 logits in a CUDA graph failed, capturing the eager step instead: %s",
                           self.fallback_reason)
            self.logits_fn = step_logits
            self.graphs.clear()
            torch.cuda.synchronize()
            return self._capture(s, params, kv_len)


class GraphedEstimator(nn.Module):
    """Drop-in for `ConditionalDecoder` inside `solve_euler_cfg`: `forward_packed` replayed from CUDA graphs.

    Lengths are padded up to a multiple of `bucket` frames so that requests of similar length share a graph (a
    capture costs about three eager calls, so capturing per request would eat most of the gain). The padded frames
    are masked: the convs are causal (a frame never sees later frames) and padded keys get the -1e10 attention bias,
    so the real frames see exactly what they would unpadded (up to the kernels' float rounding). One graph per
    (batch, bucket, masked) is kept, at most `max_graphs` (least recently used dropped; all share one memory pool).
    With `autocast_dtype` (e.g. torch.bfloat16) the estimator runs under autocast: bf16 matmuls and convs, fp32 norms
    and softmax; this changes the numbers (opt-in, `use_mixed_precision`). A failed capture logs one warning and
    the estimator runs eagerly from then on.
    """

    def __init__(self, inner: nn.Module, max_graphs: int = 16, autocast_dtype: torch.dtype | None = None,
                 warmup: int = 1, graphs: bool = True, bucket: int = 64):
        super().__init__()
        self.inner = inner
        self.graphs = graphs
        self.max_graphs = max_graphs
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self.bucket = bucket
        self.fallback_reason: str | None = None
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._pool = None

    @property
    def cfg(self):
        return self.inner.cfg

    def attn_bias(self, mask: Tensor | None) -> Tensor | None:
        return self.inner.attn_bias(mask)

    def embed_time(self, t: Tensor) -> Tensor:
        return self.inner.embed_time(t)

    def _run(self, h: Tensor, t_emb: Tensor, mask: Tensor | None, attn_bias: Tensor | None = None) -> Tensor:
        if self.autocast_dtype is None or h.device.type != "cuda":
            return self.inner.forward_packed(h, t_emb, mask, attn_bias)
        with torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False):  # graph-capture safe
            return self.inner.forward_packed(h, t_emb, mask, attn_bias).float()

    def forward_packed(self, h: Tensor, t_emb: Tensor, mask: Tensor | None = None,
                       attn_bias: Tensor | None = None) -> Tensor:
        """h (B, T, 320), t_emb (B, E), mask (B, T, 1) or None -> (B, T, 80) (a view of a graph buffer)."""
        if not self.graphs or h.device.type != "cuda":
            return self._run(h, t_emb, mask, attn_bias)
        B, T, _ = h.shape
        Tp = -(-T // self.bucket) * self.bucket
        masked = mask is not None or Tp != T
        key = (B, Tp, h.shape[2], tuple(t_emb.shape), masked, h.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, h, t_emb)
            except Exception as err:  # noqa: BLE001 - a capture that fails is reported once; eager from then on
                self._fall_back(err)
                return self._run(h, t_emb, mask, attn_bias)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        g, (sh, st, sm), out = entry
        self._fill(sh, st, sm, h, t_emb, mask)
        g.replay()
        return out[:, :T]

    @staticmethod
    def _fill(sh: Tensor, st: Tensor, sm: Tensor | None, h: Tensor, t_emb: Tensor, mask: Tensor | None) -> None:
        T = h.shape[1]
        sh[:, :T].copy_(h)
        sh[:, T:].zero_()  # padded frames must be finite: they are masked, and NaN * 0 is NaN
        st.copy_(t_emb)
        if sm is not None:
            if mask is None:
                sm[:, :T].fill_(1.0)
            else:
                sm[:, :T].copy_(mask)
            sm[:, T:].zero_()

    def _capture(self, key: tuple, h: Tensor, t_emb: Tensor):
        B, Tp, C, _, masked, dtype = key
        sh = torch.zeros(B, Tp, C, dtype=dtype, device=h.device)
        st = torch.empty_like(t_emb, memory_format=torch.contiguous_format)
        sm = torch.zeros(B, Tp, 1, dtype=dtype, device=h.device) if masked else None
        self._fill(sh, st, sm, h, t_emb, None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS / cuDNN handles, workspaces) off the capture
            for _ in range(self.warmup):
                self._run(sh, st, sm)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = self._run(sh, st, sm)
        return g, (sh, st, sm), out

    def _fall_back(self, err: Exception) -> None:
        self.graphs = False
        self._graphs.clear()
        self.fallback_reason = (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:500]
        logger.warning("CUDA graph capture of the flow estimator failed, running it eagerly: %s", self.fallback_reason)
        torch.cuda.synchronize()

    def forward(self, *args, **kwargs):  # the plain forward is not graphed
        return self.inner(*args, **kwargs)


def graph_estimator(s3gen: nn.Module, autocast_dtype: torch.dtype | None = None, max_graphs: int = 16,
                    graphs: bool = True) -> None:
    """Replace `s3gen.flow.decoder.estimator` by a `GraphedEstimator` around it (idempotent)."""
    cfm = s3gen.flow.decoder
    est = cfm.estimator
    if isinstance(est, GraphedEstimator):
        est.autocast_dtype, est.graphs = autocast_dtype, graphs
        est._graphs.clear()
        return
    cfm.estimator = GraphedEstimator(est, max_graphs=max_graphs, autocast_dtype=autocast_dtype, graphs=graphs)


def ungraph_estimator(s3gen: nn.Module) -> None:
    cfm = s3gen.flow.decoder
    if isinstance(cfm.estimator, GraphedEstimator):
        cfm.estimator = cfm.estimator.inner
