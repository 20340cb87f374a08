"""Compiled T3 decode step: `torch.compile` with inductor, a drop-in `step_fn`, and a logged fall-back to eager.

`compile_decode_step(model, mode)` returns a callable with the signature of `decode_one_token`, for
`generate_tokens(step_fn=...)`. (On a CPU whose C++ kernels build, the engine uses generation/fused.py instead:
the layer stack in one C++ call is faster than this compiled step and needs no compilation.) Two scopes:
- "logits" (default): compile `step_logits` (speech embedding, every layer over the static KV cache, final norm,
  speech head); the logits processors and the draw run eagerly. Nothing user-tunable is in the graph, and the graph
  mutates no inputs (only the KV-cache buffers), which should suit CUDA graphs (not tried: no GPU yet).
- "step": compile the whole `decode_one_token` (processors, draw, state update too). One graph as well (no graph
  break), but dynamo guards on the `SamplingParams` floats (`if penalty == 1.0:` etc.), so every distinct sampling
  setting compiles again, and the in-place `+= 1` / `scatter_` on the `DecodeState` tensors become input mutations.

Recompilation and memory (torch 2.13, measured on the tiny config and the full model, see BENCHMARKS.md):
- `kv_len` is a Python int that changes every `KV_BUCKET` positions. With dynamic=False/None dynamo specialises the
  first call on its value and recompiles once with kv_len symbolic; the bucket equal to the full cache length gets
  a graph of its own either way (that slice is contiguous: inductor guards `n_heads * kv_len != n_heads * max_seq`).
  Default dynamic=True: 2 graphs per cache size (else 3). `warm_up` compiles them all before the first generation.
- With freezing, every graph holds its own packed copy of the weights (full T3: 2 GB each, so 2 graphs = +4 GB), so
  recompiles cost memory as well as minutes. What triggers them: a larger `setup_caches` (new cache / RoPE shapes;
  allocate the caches once, at the largest size served, before compiling), tensors made outside inference mode
  (dispatch-key guards: refused with a ValueError), and calling the compiled function without the freezing flag.
- Dynamo guards on the global inductor freezing flag, which is patched in around every call (`_config`).

What it buys on CPU (BENCHMARKS.md, 2-vCPU Xeon, fp32): decode is bound by reading the 2.05 GB of linear weights
per token; eager is already within 1.3-1.5x of that floor and the compiled step gains 8-13% (fused norms / RoPE /
SwiGLU around the GEMMs, fewer ops), reaching 1.2-1.4x of the floor. max-autotune's C++ micro-GEMM needs freezing
(weights as constants, prepacked); on this machine it is no faster than plain inductor. Freezing bakes the weight
values in: a step is bound to one model (checked on every call) whose weights must not change after compilation.

Compile options are passed to torch.compile (`options=`), except freezing, which dynamo reads from the global
inductor config while tracing: it is patched in for the duration of each call (`CompiledStep._config`), never set
globally. (While a call runs, another thread compiling something else would see freezing on too.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..models.t3 import T3
from .decode import KV_BUCKET, DecodeState, choose, decode_one_token, kv_bucket, new_state, step_logits
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

MODES = ("eager", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
SCOPES = ("logits", "step")


def compile_options(mode: str, freezing: bool, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Inductor options of a torch.compile `mode` name, plus freezing and `extra` inductor options on top
    (torch.compile takes a mode *or* options). E.g. extra={"max_autotune_gemm_backends": "CPP"} keeps only the C++
    micro-GEMM, which skips the autotuning benchmarks (one choice left) and so most of max-autotune's compile time.
    """
    if mode not in MODES or mode == "eager":
        raise ValueError(f"mode must be one of {MODES[1:]}, got {mode!r}")
    if not isinstance(freezing, bool):
        raise TypeError(f"freezing must be a bool, got {freezing!r}")
    import torch._inductor

    opts = dict(torch._inductor.list_mode_options(mode))
    opts["freezing"] = freezing
    opts.update(extra or {})
    return opts


def _logits_step(model: T3, token: Tensor, state: DecodeState, noise: Tensor, params: SamplingParams, kv_len: int,
                 logits_fn) -> Tensor:
    """decode_one_token with the model part replaced by `logits_fn` (same arithmetic, same order)."""
    logits = logits_fn(model, token, state, kv_len)
    nxt = choose(logits, state, noise, params)
    state.input_pos += 1
    state.speech_pos += 1
    return nxt


def _isolated() -> dict[str, Any]:
    """`isolate_recompiles=True` where torch.compile has it (2.13): all compiles of one function share one cache
    and one recompile limit (8) otherwise, so two CompiledSteps (modes, models) would use up each other's budget."""
    import inspect

    return {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


@contextlib.contextmanager
def _freezing_flag(value: bool):
    """Set torch._inductor.config.freezing, restoring it after (a plain attribute swap: ~1 us, config.patch ~40 us)."""
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = value
    try:
        yield
    finally:
        inductor_config.freezing = old


class CompiledStep:
    """`step(model, token, state, noise, params, kv_len) -> next token (1,)`: compiled, or eager after a failure.

    The first failure of the compiled function (no C++ compiler, an inductor error, an unsupported op) logs one
    warning with its cause and switches this step to eager for good; the failed call is rerun eagerly, so a genuine
    input error still raises from the eager code. A compiled graph runs whole or not at all, so the decode state is
    not half-updated when the fall-back reruns the step.
    """

    def __init__(self, model: T3, mode: str = "default", freezing: bool = False,
                 scope: str = "logits", dynamic: bool | None = True, options: Mapping[str, Any] | None = None):
        if not isinstance(model, T3):
            raise TypeError(f"model must be a T3, got {type(model).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.model, self.mode, self.freezing, self.scope = model, mode, freezing, scope
        self.fallback_reason: str | None = None
        self._compiled = None
        self._lock = threading.Lock()
        if mode != "eager":
            target = step_logits if scope == "logits" else decode_one_token
            self._compiled = torch.compile(target, fullgraph=True, dynamic=dynamic,
                                           options=compile_options(mode, freezing, options), **_isolated())

    @property
    def is_compiled(self) -> bool:
        """True while the compiled function is in use (False for mode "eager" and after a fall-back)."""
        return self._compiled is not None

    def _run_compiled(self, fn, model, token, state, noise, params, kv_len) -> Tensor:
        if self.scope == "step":
            return fn(model, token, state, noise, params, kv_len)
        return _logits_step(model, token, state, noise, params, kv_len, fn)

    def __call__(self, model: T3, token: Tensor, state: DecodeState, noise: Tensor, params: SamplingParams,
                 kv_len: int) -> Tensor:
        if model is not self.model:
            raise ValueError("this compiled step belongs to another T3 instance (its frozen weights are baked in)")
        fn = self._compiled
        if fn is not None:
            if not (token.is_inference() and state.input_pos.is_inference()):
                raise ValueError("call the compiled step under torch.inference_mode() with tensors made there (as "
                                 "generate_tokens does): dynamo guards on it and would compile the graphs again "
                                 "(with freezing, each graph keeps its own copy of the weights)")
            try:
                with self._config():
                    return self._run_compiled(fn, model, token, state, noise, params, kv_len)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back, once, loudly
                self._fall_back(err)
        return decode_one_token(model, token, state, noise, params, kv_len)

    def _config(self):
        """Inductor's freezing flag for the duration of a call.

        Dynamo reads the *global* `torch._inductor.config.freezing` while tracing (to turn parameters into graph
        constants rather than inputs); `torch.compile(options={"freezing": True})` only reaches inductor, which then
        finds nothing to freeze (torch 2.13: the options route silently compiles unfrozen). So the flag is patched
        around every call, which is when dynamo traces (first call, recompiles).
        """
        return _freezing_flag(self.freezing)

    def _fall_back(self, err: Exception) -> None:
        with self._lock:
            if self._compiled is None:
                return
            self._compiled = None
            self.fallback_reason = (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:500]
            logger.warning("compiled T3 decode step (mode=%s, freezing=%s, scope=%s) failed, using eager: %s",
                           self.mode, self.freezing, self.scope, self.fallback_reason)

    @torch.inference_mode()
    def warm_up(self, batch: int, params: SamplingParams = SamplingParams()) -> None:
        """Compile every graph a generation can need with the current caches (kv_len = first bucket, second bucket,
        full cache length), under inference mode like `generate_tokens`. Call after `model.setup_caches(batch,
        max_seq)`.

        Writes garbage into cache slots that every generation overwrites before reading (prefill, then one slot per
        step at its own position), so it does not change any later output.
        """
        model = self.model
        if model.max_seq < 2 or model.max_batch != batch:
            raise ValueError(f"call model.setup_caches({batch}, max_seq) first (now batch={model.max_batch}, "
                             f"max_seq={model.max_seq})")
        device = model.speech_head.weight.device
        V = model.cfg.speech_vocab_size
        lens = sorted({kv_bucket(n, model.max_seq) for n in (1, KV_BUCKET + 1, model.max_seq)})
        for kv_len in lens:
            state = new_state(model, kv_len - 1, batch, device)  # one token at the last slot of the bucket
            noise = torch.ones(1, V, device=device)
            self(model, torch.zeros(1, dtype=torch.long, device=device), state, noise, params, kv_len)


def compile_decode_step(model: T3, mode: str = "default", freezing: bool = False,
                        scope: str = "logits", dynamic: bool | None = True,
                        options: Mapping[str, Any] | None = None) -> CompiledStep:
    """A compiled decode step bound to `model`, for `generate_tokens(step_fn=...)`.

    mode: a torch.compile mode name, or "eager" (the plain `decode_one_token` behind the same interface). The CPU
    default is plain inductor without freezing: as fast as "max-autotune-no-cudagraphs" + freezing=True (the C++
    micro-GEMM over prepacked weights) on the machine measured, at half the compile time and without the extra
    weight copies (BENCHMARKS.md); try the latter on a machine with more memory bandwidth. On GPU "reduce-overhead"
    / "max-autotune" add CUDA graphs (not measured yet). scope: "logits" or "step" (module docstring). options: extra
    inductor options (`compile_options`). Compilation is lazy (first call) unless `warm_up` is called.
    """
    return CompiledStep(model, mode, freezing, scope, dynamic, options)
