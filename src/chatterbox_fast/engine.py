"""OptimizedChatterboxTTS: the public engine (text -> 24 kHz speech, optionally in a cloned voice).

Pipeline per request: text front-end -> T3 (speech tokens, CFG, sampling on device) -> token clean-up ->
S3Gen flow (mel) -> HiFT (wav) -> trim-fade -> optional Perth watermark.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import kernels as cpu_kernels
from .conditioning import Conditionals, T3Cond
from .constants import REPO_ID, S3GEN_SR
from .generation.decode import PrefixKV, check_max_new_tokens, clean_speech_tokens, ensure_caches, generate_tokens
from .generation.sampling import SamplingParams
from .loading import Components, download_checkpoint, load_components
from .memory import release_file_pages, to_host
from .models.s3gen.estimator import ConditionalDecoder

logger = logging.getLogger(__name__)

WARM_POSITIONS = 1100  # KV-cache positions allocated at warm-up: conditioning 34 + text + 1000 new tokens
MAX_CFM_STEPS = 100  # upper bound accepted for generate(cfm_steps=...)
SPECULATIVE_MODES = ("int8",)  # from_local(speculative=...): the draft's weight format
VOICE_PREFIXES = 4  # voices whose T3 prefix (decode.PrefixKV, 8 MB each in fp32) stay cached
SPECULATIVE_AUTO = "auto"  # the default: "int8" wherever it applies (exact fp32 T3 through the fused CPU step)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim; torch's CPU allocator frees into malloc's arenas,
    which keep mid-sized blocks such as the per-layer KV-cache tensors). No-op elsewhere."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _resolve_device(device) -> torch.device:
    dev = torch.device(device or default_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available in this torch build")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        logger.warning("MPS is not available; falling back to CPU")
        dev = torch.device("cpu")
    return dev


def _load_watermarker():
    """The reference's watermarker, `perth.PerthImplicitWatermarker()` (weights ship inside resemble-perth).

    perth and what it imports (torchaudio, librosa, pkg_resources) are loaded here, only when enable_watermark=True.
    Its expected pkg_resources deprecation warning is silenced and its "loaded PerthNet" print goes to the log.
    """
    import contextlib
    import io

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import perth  # resemble-perth, the `watermark` extra
    except Exception as e:  # ImportError, or perth's own failing imports (pkg_resources, torchaudio)
        raise ImportError(
            "enable_watermark=True needs the Perth watermarker: pip install 'chatterbox-fast[watermark]' "
            f"(could not import resemble-perth: {e}). Or pass enable_watermark=False."
        ) from e
    if getattr(perth, "PerthImplicitWatermarker", None) is None:  # perth hides why: import it again to see
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
                from perth.perth_net.perth_net_implicit.perth_watermarker import PerthImplicitWatermarker  # noqa
            cause = "unknown cause"
        except Exception as e:  # noqa: BLE001 - reported, not handled
            cause = f"{type(e).__name__}: {e}"
        raise ImportError(
            f"resemble-perth imported but its watermarker did not ({cause}). It needs torchaudio, librosa, pyyaml "
            "and pkg_resources, which setuptools >= 81 removed: pip install 'chatterbox-fast[watermark]' "
            "(that pins 'setuptools<81'). Or pass enable_watermark=False.")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        watermarker = perth.PerthImplicitWatermarker()
        # its first call in a process sets itself up (~0.6 s, measured; later calls ~0.15 s for 10 s of audio): do it
        # here, on 1 s of quiet noise, rather than in the first request
        noise = np.random.default_rng(0).standard_normal(S3GEN_SR).astype(np.float32) * 1e-3
        watermarker.apply_watermark(noise, sample_rate=S3GEN_SR)
    if out.getvalue().strip():
        logger.debug("perth: %s", out.getvalue().strip())
    return watermarker


class _Progress:
    """A dependency-free progress line on stderr (only with verbose=True)."""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, i: int, _tok: Tensor) -> None:
        if i % 10 == 0:
            sys.stderr.write(f"\rsampling speech tokens: {i}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _serialized(method):
    """Run `method` under the engine's re-entrant lock: one request at a time per engine (the KV cache, the decode
    state and the current voice are shared), so concurrent callers (threads of a server) wait their turn instead of
    corrupting each other's generation."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class OptimizedChatterboxTTS:
    """Chatterbox TTS engine. Build it with `from_pretrained` (downloads) or `from_local` (a folder).

    Thread-safe by serialisation: `generate` and the other request methods hold a per-engine lock, so several threads
    may share one engine (they run one after another; for parallel requests use one engine per device or process)."""

    sr = S3GEN_SR
    release_kv_cache = True  # CPU: free the KV cache after each generation's T3 stage (see _release_kv_cache)

    def __init__(self, parts: Components, device: torch.device, *, enable_compilation: bool = False,
                 use_mixed_precision: bool = False, enable_watermark: bool = True, cuda_graphs: bool = True,
                 speculative: str | None = None):
        _check_speculative(speculative)
        self._lock = threading.RLock()  # see _serialized
        self.t3 = parts.t3
        self.s3gen = parts.s3gen
        self.conditioner = parts.conditioner
        self.tokenizer = parts.tokenizer
        self.conds: Conditionals | None = parts.conds
        self._prefixes: OrderedDict = OrderedDict()  # _voice_prefix: voice -> (its tensors, PrefixKV)
        self.device = device
        self.enable_compilation = enable_compilation
        self.use_mixed_precision = use_mixed_precision
        self.watermarker = _load_watermarker() if enable_watermark else None
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._step_fn = None
        self.fused_decode = False  # True: T3 decodes through the fused C++ CPU step (generation/fused.py)
        if self.cuda_graphs:
            if type(getattr(self.t3.tfmr.layers[0].self_attn, "q_proj", None)) is torch.nn.Linear:  # not int8
                self.t3.fuse_projections()  # fewer GEMM launches per decode step
            self._step_fn = self._graph_decode(enable_compilation)
        elif device.type == "cpu" and (fused := self._fused_decode()) is not None:
            self._step_fn = fused  # faster than the compiled step, and nothing to compile
            self.fused_decode = True
        elif enable_compilation:
            self._step_fn = self._compile_decode()
        if device.type == "cuda" and (self.cuda_graphs or use_mixed_precision):
            from .generation.cuda_graph import graph_estimator

            graph_estimator(self.s3gen, torch.bfloat16 if use_mixed_precision else None, graphs=self.cuda_graphs)
        self._speculative = None  # generation/speculative.SpeculativeDecoder when speculative is on
        if speculative is not None:
            self._speculative = self._speculative_decoder(speculative)
        if enable_compilation and self._step_fn is not None and not self.fused_decode:
            self.warm_up()
        self._prepare_voice_prefix()

    def _speculative_decoder(self, mode: str):
        """The SpeculativeDecoder for `mode`; "auto": None where it does not apply (no error)."""
        from .generation.fused import fused_step_unsupported
        from .generation.speculative import SpeculativeDecoder, target_linears_supported

        reason = None if self.fused_decode else "T3 does not decode through the fused CPU step here"
        reason = reason or target_linears_supported(self.t3) or fused_step_unsupported(self.t3)
        qkv = self.t3.tfmr.layers[0].self_attn.qkv_proj
        fp32 = type(qkv) is torch.nn.Linear and qkv.weight.dtype == torch.float32
        # auto: fp32 T3 only. With bf16 weights the k-token check costs ~3-4 one-token steps on the 2-core machine
        # measured (compute-bound), so speculating there was no faster (BENCHMARKS.md); "int8" still asks for it
        if (reason is not None or not fp32) and mode == SPECULATIVE_AUTO:
            return None
        if reason is not None:
            raise ValueError(f"speculative={mode!r} needs fp32 or bf16-weight T3 decoding through the fused CPU step "
                             "(device cpu, quantize None or 'bf16' (use_mixed_precision on a CPU), C++ kernels "
                             f"built): {reason}")
        return SpeculativeDecoder(self.t3, self._step_fn)

    @_serialized
    def warm_up(self) -> None:
        """Compile / capture the decode step now rather than in the first request (called at load with
        enable_compilation=True). The KV cache is allocated once, for WARM_POSITIONS positions (prompt, text and the
        default 1000 new tokens), so requests up to that size never reallocate it nor compile again."""
        from .generation.compile import CompiledStep
        from .generation.decode import cache_len

        self.t3.setup_caches(2, cache_len(WARM_POSITIONS))
        if isinstance(self._step_fn, CompiledStep):
            self._step_fn.warm_up(2)
            self._release_kv_cache()
        elif self._step_fn is not None and self.conds is not None:  # CUDA graphs: one short request
            ids = self.tokenizer.prepare("Warm up.").ids
            self.generate_tokens(ids, self.conds, SamplingParams(max_new_tokens=4))

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, device=None, enable_compilation: bool = False, use_mixed_precision: bool = False,
                        enable_watermark: bool = True, repo_id: str = REPO_ID, revision: str | None = None,
                        cache_dir: str | None = None, quantize: str | None = None,
                        cuda_graphs: bool = True, s3gen_quantize: str | None = None,
                        kv_cache: str | None = None,
                        speculative: str | None = SPECULATIVE_AUTO) -> "OptimizedChatterboxTTS":
        """Download (or reuse the Hugging Face cache of) ResembleAI/chatterbox and load it."""
        ckpt = download_checkpoint(repo_id, revision, cache_dir)
        return cls.from_local(ckpt, device=device, enable_compilation=enable_compilation,
                              use_mixed_precision=use_mixed_precision, enable_watermark=enable_watermark,
                              quantize=quantize, cuda_graphs=cuda_graphs, s3gen_quantize=s3gen_quantize,
                              kv_cache=kv_cache, speculative=speculative)

    @classmethod
    def from_local(cls, ckpt_dir, device=None, enable_compilation: bool = False, use_mixed_precision: bool = False,
                   enable_watermark: bool = True, quantize: str | None = None,
                   cuda_graphs: bool = True, s3gen_quantize: str | None = None,
                   kv_cache: str | None = None, speculative: str | None = SPECULATIVE_AUTO) -> "OptimizedChatterboxTTS":
        """Load from a folder holding ve.safetensors, t3_cfg.safetensors, s3gen.safetensors, tokenizer.json
        and (optionally) conds.pt, the built-in voice. Every key is checked: no silent partial loads.
        quantize="int8": weight-only int8 for T3's layer linears (quantize.py; drift vs fp32 in BENCHMARKS.md);
        "bf16": weight-only bf16 with fp32 math, which is what use_mixed_precision=True selects for T3 on a CPU (T3's
        decode is bound by the weight bytes it reads, which bf16 halves; its math stays fp32). On a CPU with native
        bf16 (AMX or AVX512-BF16, `quantize.cpu_has_fast_bf16`) use_mixed_precision=True also selects
        s3gen_quantize="bf16" (below) unless s3gen_quantize is given; elsewhere bf16 arithmetic is slower than fp32.
        cuda_graphs (CUDA only): replay T3's decode step and the flow estimator from CUDA graphs (same kernels, no
        launch overhead; generation/cuda_graph.py). False runs them eagerly.
        s3gen_quantize="int8" (CPU only, opt-in, CHANGES THE OUTPUT): int8 GEMMs (int8 weights and per-row int8
        activations) for the transformer linears of S3Gen's flow estimator (quantize.quantize_s3gen; speed and the
        mel's drift in BENCHMARKS.md). s3gen_quantize="int8-attn" also runs the estimator's attention on int8 dot
        products (AVX512-VNNI CPUs only; a ValueError elsewhere). s3gen_quantize="bf16" (CPU, opt-in, CHANGES THE
        OUTPUT): the estimator's transformer linears as bf16 GEMMs and its attention on bf16 q / k / v, fp32 residual
        stream and norms; several times faster where the CPU has native bf16 (AMX), slower elsewhere (a warning).
        kv_cache: T3's KV cache storage. None: fp32 (exact), bf16 in the CPU's low-precision modes (quantize set,
        or use_mixed_precision on a CPU); "fp32" / "bf16" force one; "int8" (CPU only, opt-in, CHANGES THE OUTPUT):
        one int8 per value with an fp32 scale per (head, position) row, a quarter of the bytes each decode step reads
        from the cache (what grows with the length of the generation; drift in BENCHMARKS.md).
        speculative (does NOT change the output): "int8" (CPU; fp32 T3, or bf16-weight T3 where it measured no
        faster): an int8 copy of T3's layers
        (+0.5 GB) drafts a few tokens per round with the same sampling noise, and the fp32 model checks them all in
        one pass over its weights (generation/speculative.py): the same tokens as without it, bit for bit, in less
        time (BENCHMARKS.md); how many per round adapts to how often the draft agrees, down to none. "auto" (the
        default): "int8" where it applies (device cpu, quantize=None, use_mixed_precision=False, the C++ kernels
        built), off elsewhere. None: off (0.5 GB less memory)."""
        from .quantize import (KV_CACHE_DTYPES, check_int8_attention_supported, check_kv_cache_mode,
                               check_quantize_mode, check_s3gen_quantize_mode, cpu_has_fast_bf16, quantize_s3gen,
                               quantize_t3)

        check_quantize_mode(quantize)
        check_s3gen_quantize_mode(s3gen_quantize)
        check_kv_cache_mode(kv_cache)
        dev = _resolve_device(device)
        if kv_cache == "int8" and dev.type != "cpu":
            raise ValueError(f"kv_cache='int8' is a CPU mode (the fused CPU decode step reads it); on {dev.type} "
                             "leave it None")
        if s3gen_quantize is not None and dev.type != "cpu":
            raise ValueError(f"s3gen_quantize={s3gen_quantize!r} is a CPU mode (int8 / bf16 GEMMs); on {dev.type} "
                             "leave it None (use_mixed_precision=True selects bf16 on CUDA)")
        check_int8_attention_supported(s3gen_quantize)
        _check_speculative(speculative)
        if dev.type == "cpu":
            cpu_kernels.load()  # our C++ kernels (T3 decode attention, int8 / bf16 linears); a failed build warns
        t3_dtype = torch.float32
        if use_mixed_precision:
            if dev.type == "cuda":
                t3_dtype = torch.bfloat16
            elif dev.type == "cpu":
                if s3gen_quantize is None and cpu_has_fast_bf16():
                    s3gen_quantize = "bf16"  # the flow estimator's GEMMs and attention in bf16 (AMX / AVX512-BF16)
                if quantize is None and cpu_kernels.available():  # (loaded above)
                    quantize = "bf16"  # T3: bf16 weights, fp32 math (decode reads weights; half the bytes)
                elif quantize is None and s3gen_quantize is None:
                    warnings.warn("use_mixed_precision=True has no effect on this CPU: the bf16-weight kernel could "
                                  f"not be built ({cpu_kernels.error()}) and it has no native bf16; running fp32",
                                  stacklevel=2)
            elif dev.type != "cpu":
                warnings.warn(f"use_mixed_precision=True has no effect on {dev.type}: bf16 is used on CUDA only",
                              stacklevel=2)
        parts = load_components(Path(ckpt_dir), dev, t3_dtype)
        if quantize is not None:
            # the float weights being replaced are our private memory-mapped checkpoint tensors: drop their pages
            quantize_t3(parts.t3, quantize, release=release_file_pages if dev.type == "cpu" else None)
            if dev.type == "cpu" and cpu_kernels.decode_attention_ready():
                parts.t3.kv_dtype = torch.bfloat16  # low-precision modes: a bf16 KV cache too (half its bytes)
        if kv_cache is not None:
            parts.t3.kv_dtype = KV_CACHE_DTYPES[kv_cache]
            if kv_cache == "fp32" and t3_dtype == torch.bfloat16:
                parts.t3.kv_dtype = None  # CUDA bf16 activations: the cache follows them
        # tap-major causal convs and one q/k/v GEMM per attention (same values; the int8 mode has its own q/k/v)
        for est in [] if parts.s3gen is None else [m for m in parts.s3gen.modules()
                                                    if isinstance(m, ConditionalDecoder)]:
            for t in est.inference_layout_(fuse_qkv=s3gen_quantize is None):
                if dev.type == "cpu":
                    release_file_pages(t)  # the replaced checkpoint tensors: drop their memory-mapped pages
        if s3gen_quantize is not None and parts.s3gen is not None:
            if s3gen_quantize == "bf16" and not cpu_has_fast_bf16():
                warnings.warn("s3gen_quantize='bf16': this CPU has no native bf16 (AMX / AVX512-BF16), so the "
                              "estimator's bf16 GEMMs are emulated and likely slower than fp32", stacklevel=2)
            quantize_s3gen(parts.s3gen, s3gen_quantize, release=release_file_pages)
        return cls(parts, dev, enable_compilation=enable_compilation, use_mixed_precision=use_mixed_precision,
                   enable_watermark=enable_watermark, cuda_graphs=cuda_graphs, speculative=speculative)

    def _graph_decode(self, compiled: bool):
        """CUDA: the decode step replayed from CUDA graphs; with compilation, its logits part is an inductor graph
        (fused kernels) captured inside them. Numbers are those of the eager step (same kernels) or of inductor."""
        from .generation.cuda_graph import CUDAGraphDecodeStep

        logits_fn = None
        if compiled:
            try:
                from .generation.decode import step_logits

                logits_fn = torch.compile(step_logits, fullgraph=True, dynamic=True)
            except Exception as e:  # noqa: BLE001 - as _compile_decode
                warnings.warn(f"enable_compilation=True: could not compile the decode step ({type(e).__name__}: "
                              f"{e}); using eager kernels in CUDA graphs", stacklevel=3)
        return CUDAGraphDecodeStep(self.t3, logits_fn)

    def _fused_decode(self):
        """CPU: T3's layers in one C++ call per token (generation/fused.py; measured 1.1-1.4x faster than the
        compiled step, BENCHMARKS.md), when the kernels are built and the layers fit; else None (module path)."""
        from .generation.fused import FusedDecodeStep, fused_step_unsupported
        from .quantize import pack_t3

        attn = self.t3.tfmr.layers[0].self_attn
        if cpu_kernels.available() and attn.qkv_proj is None and type(attn.q_proj) is torch.nn.Linear:
            # fp32 (quantize_t3 fuses the others): q/k/v and gate/up as one weight each, the kernel's layout; the
            # replaced checkpoint weights' memory-mapped pages are dropped (a later read would fault them back in)
            self.t3.fuse_projections(release=release_file_pages)
        reason = fused_step_unsupported(self.t3)
        if reason is not None:
            logger.info("fused CPU decode step not used: %s", reason)
            return None
        pack_t3(self.t3)  # int8 / bf16: the kernel's packed layout (one sequential stream per block of rows)
        return FusedDecodeStep(self.t3)

    def _compile_decode(self):
        try:
            from .generation.compile import compile_decode_step

            return compile_decode_step(self.t3)
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager, as the guide promises
            warnings.warn(f"enable_compilation=True: could not compile the decode step ({type(e).__name__}: {e}); "
                          "using eager", stacklevel=3)
            return None

    # ---- voices -------------------------------------------------------------------------------------------
    @_serialized
    @torch.inference_mode()
    def prepare_conditionals(self, wav, exaggeration: float = 0.5, sample_rate: int | None = None) -> Conditionals:
        """Clone a voice from reference audio (a path, or an array with `sample_rate`); it becomes the current
        voice and is returned (save it with `.save(path)`, reuse it with `set_voice`)."""
        _check_exaggeration(exaggeration)
        self.conds = self.conditioner(wav, exaggeration, source_sr=sample_rate)
        self._prepare_voice_prefix()
        return self.conds

    @_serialized
    def set_voice(self, conds: Conditionals | str | Path) -> None:
        """Use a voice profile (a Conditionals, or a conds.pt path) for the following requests."""
        if not isinstance(conds, Conditionals):
            conds = Conditionals.load(conds)
        self.conds = conds.to(self.device)
        self._prepare_voice_prefix()

    @_serialized
    def save_voice(self, path) -> None:
        if self.conds is None:
            raise RuntimeError("no voice to save: call prepare_conditionals first")
        self.conds.save(path)

    # ---- synthesis ----------------------------------------------------------------------------------------
    @_serialized
    @torch.inference_mode()
    def generate(self, text: str, audio_prompt_path=None, exaggeration: float = 0.5, cfg_weight: float = 0.5,
                 temperature: float = 0.8, repetition_penalty: float = 1.2, min_p: float = 0.05,
                 top_p: float = 1.0, max_new_tokens: int = 1000, seed: int | None = None,
                 verbose: bool = False, cfm_steps: int | None = None) -> Tensor:
        """Speak `text`. Returns a float32 tensor (1, n) at `self.sr` (24 kHz).

        Same defaults as the reference `ChatterboxTTS.generate`. `seed` makes a run reproducible.
        `cfm_steps` (opt-in, changes the output): Euler steps of S3Gen's flow matching instead of the reference's
        10; the flow's time scales with it (5 steps: about half), at a drift from the exact mel that BENCHMARKS.md
        measures. None = 10, exact.
        """
        _check_cfm_steps(cfm_steps)
        params = SamplingParams(temperature=temperature, cfg_weight=cfg_weight,
                                repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                max_new_tokens=max_new_tokens)
        check_max_new_tokens(self.t3, params)
        _check_exaggeration(exaggeration)
        _check_seed(seed)
        enc = self.tokenizer.prepare(text)  # validates: TypeError / ValueError with a clear message
        if audio_prompt_path is not None:
            self.prepare_conditionals(audio_prompt_path, exaggeration)
        if self.conds is None:
            raise RuntimeError("no voice: this checkpoint has no conds.pt; pass audio_prompt_path or call "
                               "prepare_conditionals first")
        gen = torch.Generator(self.device).manual_seed(int(seed)) if seed is not None else None
        tokens = self.generate_tokens(enc.ids, self.conds.with_exaggeration(exaggeration), params, gen, verbose)
        wav = self.tokens_to_wav(tokens, generator=gen, cfm_steps=cfm_steps)
        return self._finish(wav)

    @_serialized
    @torch.inference_mode()
    def generate_tokens(self, text_ids: Tensor, conds: Conditionals, params: SamplingParams,
                        generator: torch.Generator | None = None, verbose: bool = False) -> Tensor:
        """T3 only: text ids (1, L) with SOT/EOT -> clean speech tokens (n,) long."""
        t3, c = self.t3, conds.t3
        cond = self._cond_embeds(c)
        x = t3.prefill_embeds(cond, text_ids.to(self.device), cfg_batch=params.use_cfg)
        prefix = self._voice_prefix(c, cond.shape[1] - 1)  # all but the emotion token: the same for every request
        progress = _Progress(params.max_new_tokens) if verbose else None
        try:
            if self._speculative is not None:
                raw = self._speculative.generate(x, params, generator=generator, on_token=progress, prefix=prefix)
            else:
                raw = generate_tokens(t3, x, params, generator=generator, step_fn=self._step_fn, on_token=progress,
                                      prefix=prefix)
        finally:
            self._release_kv_cache()
        if progress is not None:
            progress.close()
        if verbose and self._speculative is not None:
            st = self._speculative.last_stats
            logger.info("speculative decoding: %d tokens in %d rounds; %d of %d drafted tokens agreed; k per round %s",
                        st["tokens"], st["rounds"], st["accepted"], st["drafted"], st["k_rounds"])
        return clean_speech_tokens(raw)

    @property
    def speculative_stats(self) -> dict | None:
        """The last generation's speculative decoding counts (tokens, rounds, drafted, accepted, k_rounds: rounds
        per k), or None when speculative decoding is off. How often the draft agrees decides its speed-up."""
        return None if self._speculative is None else dict(self._speculative.last_stats)

    def _voice_prefix(self, c: T3Cond, length: int) -> PrefixKV:
        """The voice's T3 prefix (decode.PrefixKV: its KV-cache slots, computed when the voice is set, or else by
        its first request, and restored by every later one), for the last VOICE_PREFIXES voices used. Keyed by the
        voice's tensors; the PrefixKV itself checks the embeddings, so a voice edited in place is recomputed, never
        reused stale."""
        key = (id(c.speaker_emb), id(c.prompt_tokens), length)
        hit = self._prefixes.get(key)
        if hit is not None and hit[0] is c.speaker_emb and hit[1] is c.prompt_tokens:
            self._prefixes.move_to_end(key)
            return hit[2]
        prefix = PrefixKV(length)
        self._prefixes[key] = (c.speaker_emb, c.prompt_tokens, prefix)  # the tensors kept: their ids stay unique
        while len(self._prefixes) > VOICE_PREFIXES:
            self._prefixes.popitem(last=False)
        return prefix

    def _cond_embeds(self, c: T3Cond) -> Tensor:
        """T3's conditioning embeddings (1, 34, D) of a voice at its exaggeration."""
        dt = self.t3.speech_head.weight.dtype
        return self.t3.cond_embeds(c.speaker_emb.to(dt), c.prompt_tokens,
                                   torch.tensor([c.exaggeration], device=self.device, dtype=dt))

    @torch.inference_mode()
    def _prepare_voice_prefix(self) -> None:
        """Compute the current voice's T3 prefix (`_voice_prefix`) now, as part of preparing the voice, so that
        its first request restores it like the later ones (~0.2 s on a 2-core CPU, fp32)."""
        if self.conds is None:
            return
        t3, c = self.t3, self.conds.t3
        cond = self._cond_embeds(c)
        prefix = self._voice_prefix(c, cond.shape[1] - 1)
        ensure_caches(t3, 2, cond.shape[1], zero=False)  # the prefix's causal prefill reads the slots it writes
        try:
            prefix.load_into(t3, cond)
        finally:
            self._release_kv_cache()

    def _release_kv_cache(self) -> None:
        """CPU: free T3's KV cache while S3Gen runs and between requests (peak RSS: the cache and the vocoder's
        buffers are never held at once); the next request allocates it again at the same size (uninitialised for
        the fused step: only the pages of the slots it writes are touched; zeroed otherwise: ~0.3 s for 0.7 GB on
        a 2-core CPU). On CUDA it stays: the CUDA graphs are bound to its addresses."""
        if self.device.type == "cpu" and self.release_kv_cache:
            self.t3.release_caches()
            if self._speculative is not None:
                self._speculative.release_caches()
            _trim_heap()

    @_serialized
    @torch.inference_mode()
    def tokens_to_wav(self, speech_tokens: Tensor, conds: Conditionals | None = None,
                      generator: torch.Generator | None = None, cfm_steps: int | None = None) -> Tensor:
        """S3Gen only: speech tokens (n,) -> wav (1, samples) at 24 kHz (trim-faded, not watermarked)."""
        _check_cfm_steps(cfm_steps)
        if not isinstance(speech_tokens, Tensor):
            raise TypeError(f"speech_tokens must be a torch.Tensor of token ids, got {type(speech_tokens).__name__}")
        g = (conds or self.conds).gen
        if speech_tokens.numel() == 0:
            logger.warning("T3 produced no valid speech tokens; returning silence")
            return torch.zeros(1, 0)
        return self.s3gen.inference(speech_tokens.to(self.device), g.prompt_token, g.prompt_feat, g.embedding,
                                    generator=generator, n_timesteps=cfm_steps)

    def _finish(self, wav: Tensor) -> Tensor:
        wav = to_host(wav.float())  # from a GPU: a pinned-memory copy
        if self.watermarker is not None and wav.numel():
            marked = self.watermarker.apply_watermark(wav.squeeze(0).numpy(), sample_rate=self.sr)
            wav = torch.from_numpy(np.ascontiguousarray(marked, dtype=np.float32)).unsqueeze(0)
        return wav


def _check_speculative(mode) -> None:
    if mode is not None and mode not in SPECULATIVE_MODES + (SPECULATIVE_AUTO,):
        raise ValueError(f"speculative must be None, {SPECULATIVE_AUTO!r} or one of {SPECULATIVE_MODES}, got "
                         f"{mode!r}")


def _check_cfm_steps(n) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CFM_STEPS):
        raise ValueError(f"cfm_steps must be None (10, exact) or an int in [1, {MAX_CFM_STEPS}], got {n!r}")


def _check_seed(seed) -> None:
    """None, or an int that torch.Generator.manual_seed takes (numpy integers too; not bool)."""
    if seed is None:
        return
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not -(2 ** 63) <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {seed!r}")


def _check_exaggeration(x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x) or x < 0:
        raise ValueError(f"exaggeration must be a finite number >= 0, got {x!r}")
