"""The optimisation guide's snippets (resemble-ai/chatterbox OPTIMIZATION_GUIDE.md), run as the guide writes them.

The snippet texts below are the guide's, verbatim; `_port` changes only their import lines (chatterbox ->
chatterbox_fast) and saves with soundfile instead of torchaudio (as our README says), and fails if any of those
lines is missing. What this offline CPU machine needs is done around the text, never in it:
- `from_pretrained` -> `from_local(<oracle checkpoint>)` and device "cuda" -> "cpu", by a patched classmethod that
  first checks the guide's call against the real `from_pretrained` signature;
- the checkpoint is read once per module (`load_components` cached) and its built-in voice prompt cut to 1 s, and
  `generate` is capped at 6 new tokens with seed 0 unless given (a wrapper): a full 1000-token CPU run takes minutes;
- the presets' undefined `text` is given, and the voice-cloning snippet's "path/to/reference.wav" is written (a
  speech-like clip) under the working directory.
- enable_compilation=True: compiling the 0.5B T3 decode step takes ~270 s on this 2-core CPU
  (benchmarks/results/t3_decode.json), too slow for a unit test (tests/generation/test_compile.py compiles a tiny
  T3 for real). Here torch.compile is made to fail the way an unsupported system does, and the tests assert the
  guide's documented behaviour ("Model will still work, just without compilation speedup"): one warning, eager
  decoding, and the same output as with enable_compilation=False. (On a CPU with our C++ kernels the engine decodes
  through the fused step, generation/fused.py, and compiles nothing for T3; one test switches that off.)
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass

import pytest
import soundfile as sf
import torch

import chatterbox_fast.engine as engine_mod
import chatterbox_fast.quantize as quantize_mod
from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast import OptimizedChatterboxTTS
from chatterbox_fast.generation.compile import CompiledStep
from chatterbox_fast.generation.fused import FusedDecodeStep

MAX_NEW_TOKENS = 6
PRESET_TEXT = "Production agents need fast, clear speech."
pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the guide's snippets, verbatim ---------------------------------------------------------------------------
BASIC = '''
import torch
import torchaudio as ta
from chatterbox.optimized_tts import OptimizedChatterboxTTS

device = "cuda"
model = OptimizedChatterboxTTS.from_pretrained(
    device=device,
    enable_compilation=True,      # Enable torch.compile
    use_mixed_precision=True,     # Enable BF16
    enable_watermark=False,       # Disable for max speed (or True for production)
)

text = "Hello, this is optimized TTS!"
wav = model.generate(text, verbose=False)  # verbose=False removes progress bar
ta.save("output.wav", wav, model.sr)
'''

ADVANCED = '''
from chatterbox.optimized_tts import OptimizedChatterboxTTS
from chatterbox.optimizations.flash_attention import enable_flash_attention_for_llama

# Load model
model = OptimizedChatterboxTTS.from_pretrained(
    device="cuda",
    enable_compilation=True,
    use_mixed_precision=True,
    enable_watermark=False,
)

# Enable Flash Attention
model.t3.tfmr = enable_flash_attention_for_llama(model.t3.tfmr)

# Generate with custom parameters
wav = model.generate(
    "Your text here",
    exaggeration=0.5,      # Emotion control
    cfg_weight=0.5,        # Guidance strength
    temperature=0.8,       # Sampling temperature
    verbose=False,         # No progress bar for speed
)
'''

VOICE_CLONING = '''
# Reference audio for voice cloning
reference_audio = "path/to/reference.wav"

# Generate with custom voice
wav = model.generate(
    "Text to synthesize",
    audio_prompt_path=reference_audio,
    exaggeration=0.6,
    cfg_weight=0.4,
    verbose=False,
)
'''

MAXIMUM_SPEED = '''
model = OptimizedChatterboxTTS.from_pretrained(
    device="cuda",
    enable_compilation=True,
    use_mixed_precision=True,
    enable_watermark=False,  # Disable for max speed
)

wav = model.generate(
    text,
    cfg_weight=0.3,  # Lower CFG for faster generation
    verbose=False,   # No progress bar
)
'''

BALANCED = '''
model = OptimizedChatterboxTTS.from_pretrained(
    device="cuda",
    enable_compilation=True,
    use_mixed_precision=True,
    enable_watermark=True,  # Enable for responsible AI
)

wav = model.generate(
    text,
    cfg_weight=0.5,  # Default quality
    verbose=False,
)
'''

DEVELOPMENT = '''
model = OptimizedChatterboxTTS.from_pretrained(
    device="cuda",
    enable_compilation=False,  # Disable for easier debugging
    use_mixed_precision=False,
    enable_watermark=True,
)

wav = model.generate(
    text,
    verbose=True,  # Show progress bar
)
'''

# the only edits to the guide's text: imports, and saving with soundfile (README)
PORT = {
    "import torch": "import torch",
    "from chatterbox.optimized_tts import OptimizedChatterboxTTS": "from chatterbox_fast import OptimizedChatterboxTTS",
    "from chatterbox.optimizations.flash_attention import enable_flash_attention_for_llama":
        "from chatterbox_fast import enable_flash_attention_for_llama",
    "import torchaudio as ta": "import soundfile as sf",
    'ta.save("output.wav", wav, model.sr)': 'sf.write("output.wav", wav.squeeze(0).numpy(), model.sr)',
}


def _port(snippet: str) -> str:
    out = []
    for line in snippet.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")) or stripped.startswith("ta."):
            assert stripped in PORT, f"unported line in a guide snippet: {line!r}"
            line = line.replace(stripped, PORT[stripped])
        out.append(line)
    return "\n".join(out)


def run_snippet(snippet: str, name: str, namespace: dict | None = None) -> dict:
    ns = {} if namespace is None else namespace
    exec(compile(_port(snippet), f"<guide: {name}>", "exec"), ns)  # noqa: S102 - the guide's own code
    return ns


def preset_namespace() -> dict:
    """What a reader has in scope when reaching the presets: the class (Basic usage) and some `text`."""
    return {"OptimizedChatterboxTTS": OptimizedChatterboxTTS, "text": PRESET_TEXT}


# ---- the offline CPU harness ----------------------------------------------------------------------------------
@dataclass
class Call:
    model: OptimizedChatterboxTTS
    text: str
    kwargs: dict
    wav: torch.Tensor


class SimulatedCompilerFailure(RuntimeError):
    pass


def _failing_compile(fn=None, **_kw):
    def compiled(*a, **k):
        raise SimulatedCompilerFailure("simulated: inductor cannot compile on this system")

    return compiled if fn is not None else (lambda f: compiled)


@pytest.fixture(scope="module")
def guide(oracle_ckpt, short_voice):
    """Patches from_pretrained / load_components / generate / torch.compile for the module; yields the generate
    calls made (newest last)."""
    calls: list[Call] = []
    cache = {}
    real_load = engine_mod.load_components
    real_generate = OptimizedChatterboxTTS.generate
    signature = inspect.signature(OptimizedChatterboxTTS.from_pretrained)

    def load_once(ckpt_dir, device, t3_dtype=torch.float32):
        assert t3_dtype == torch.float32, "on CPU use_mixed_precision must keep T3 in fp32"
        if "parts" not in cache:
            cache["parts"] = real_load(ckpt_dir, device, t3_dtype)
            cache["parts"].conds = short_voice
        return cache["parts"]

    def from_pretrained(cls, *args, **kwargs):
        a = signature.bind(*args, **kwargs)  # TypeError if the guide's call does not fit the real one
        a.apply_defaults()
        a = a.arguments
        device = "cpu" if a["device"] == "cuda" else a["device"]
        return cls.from_local(oracle_ckpt, device=device, enable_compilation=a["enable_compilation"],
                              use_mixed_precision=a["use_mixed_precision"], enable_watermark=a["enable_watermark"])

    def generate(self, text, **kwargs):
        kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens", 1000), MAX_NEW_TOKENS)
        kwargs.setdefault("seed", 0)
        wav = real_generate(self, text, **kwargs)
        calls.append(Call(self, text, dict(kwargs), wav))
        return wav

    def record_quantize(model, mode="int8", release=None):
        # the loaded T3 is shared by every snippet (cached above), so it is not converted: the conversion asked
        # for is recorded (use_mixed_precision=True on CPU -> "bf16"; tested for real in tests/engine/test_engine.py)
        model.quantize_calls = getattr(model, "quantize_calls", []) + [mode]
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_mod, "quantize_t3", record_quantize)
        mp.setattr(engine_mod, "load_components", load_once)
        mp.setattr(OptimizedChatterboxTTS, "from_pretrained", classmethod(from_pretrained))
        mp.setattr(OptimizedChatterboxTTS, "generate", generate)
        mp.setattr(torch, "compile", _failing_compile)
        yield calls


def _check_wav(wav: torch.Tensor) -> None:
    assert wav.dtype == torch.float32 and wav.dim() == 2 and wav.shape[0] == 1 and wav.shape[1] > 0
    assert torch.isfinite(wav).all()


def _check_compile_fell_back(model: OptimizedChatterboxTTS, caplog) -> None:
    """enable_compilation=True under a failing torch.compile: on a CPU with our kernels the engine decodes through
    the fused C++ step and never compiles T3 (no warning); otherwise the compile fails, warns once, runs eager."""
    step = model._step_fn
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert model.enable_compilation
    if model.fused_decode:
        assert cpu_kernels.available() and isinstance(step, FusedDecodeStep)
        assert not any("using eager" in m for m in msgs), msgs
        return
    assert isinstance(step, CompiledStep)
    assert not step.is_compiled and "simulated" in step.fallback_reason
    assert sum("using eager" in m for m in msgs) == 1, msgs


def _mixed_precision_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, UserWarning) and "use_mixed_precision" in str(w.message)]


def _check_cpu_mixed_precision(model, record) -> None:
    """use_mixed_precision=True on a CPU: T3's layer weights to bf16 with fp32 math (our kernel) and no warning;
    without the kernel, one warning and fp32. The T3 parameters themselves stay fp32 either way."""
    calls = getattr(model.t3, "quantize_calls", [])
    if cpu_kernels.available():
        assert not _mixed_precision_warnings(record) and calls and calls[-1] == "bf16"
    else:
        assert len(_mixed_precision_warnings(record)) == 1 and not calls
    model.t3.quantize_calls = []
    assert all(p.dtype == torch.float32 for p in model.t3.parameters())


# ---- the snippets ---------------------------------------------------------------------------------------------
def test_basic_usage(guide, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ns = run_snippet(BASIC, "basic usage")
    model, wav = ns["model"], ns["wav"]
    _check_cpu_mixed_precision(model, record)
    assert model.watermarker is None and model.device == torch.device("cpu")
    _check_compile_fell_back(model, caplog)
    _check_wav(wav)
    call = guide[-1]
    assert call.model is model and call.text == "Hello, this is optimized TTS!" and not call.kwargs["verbose"]
    info = sf.info(tmp_path / "output.wav")
    assert info.samplerate == 24000 and info.channels == 1 and info.frames == wav.shape[1]


def test_compile_failure_falls_back_without_the_fused_step(guide, tmp_path, monkeypatch, caplog):
    """Where the fused CPU step does not apply (no C++ compiler; CUDA), enable_compilation=True compiles the decode
    step: a failing compile warns once and the model decodes eagerly, as the guide promises."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(OptimizedChatterboxTTS, "_fused_decode", lambda self: None)
    ns = run_snippet(BASIC, "basic usage")
    assert not ns["model"].fused_decode
    _check_compile_fell_back(ns["model"], caplog)
    _check_wav(ns["wav"])


def test_advanced_usage_then_voice_cloning(guide, tmp_path, monkeypatch, caplog, short_voice):
    import synth

    monkeypatch.chdir(tmp_path)
    (tmp_path / "path" / "to").mkdir(parents=True)
    sf.write(tmp_path / "path/to/reference.wav", synth.speech_like(2.0, 44100, seed=21), 44100)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ns = run_snippet(ADVANCED, "advanced usage")
    _check_cpu_mixed_precision(ns["model"], record)
    model = ns["model"]
    tfmr = model.t3.tfmr
    _check_compile_fell_back(model, caplog)
    _check_wav(ns["wav"])
    assert guide[-1].kwargs == dict(exaggeration=0.5, cfg_weight=0.5, temperature=0.8, verbose=False,
                                    max_new_tokens=MAX_NEW_TOKENS, seed=0)

    run_snippet(VOICE_CLONING, "voice cloning", ns)  # continues with the advanced snippet's `model`
    _check_wav(ns["wav"])
    assert model.t3.tfmr is tfmr
    call = guide[-1]
    assert call.model is model and call.kwargs["exaggeration"] == 0.6 and call.kwargs["cfg_weight"] == 0.4
    # the cloned voice replaced the built-in one: 2 s of reference -> 50 prompt tokens, 100 prompt mel frames
    assert model.conds is not short_voice
    assert model.conds.gen.prompt_token.shape == (1, 50) and model.conds.gen.prompt_feat.shape == (1, 100, 80)
    assert not torch.equal(model.conds.gen.embedding, short_voice.gen.embedding)


def test_maximum_speed_preset(guide, caplog):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ns = run_snippet(MAXIMUM_SPEED, "maximum speed", preset_namespace())
    _check_cpu_mixed_precision(ns["model"], record)
    model = ns["model"]
    assert model.watermarker is None
    _check_compile_fell_back(model, caplog)
    _check_wav(ns["wav"])
    call = guide[-1]
    assert call.text == PRESET_TEXT and call.kwargs["cfg_weight"] == 0.3 and call.kwargs["verbose"] is False


def test_balanced_and_development_presets(guide, caplog, capsys, perth):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        balanced = run_snippet(BALANCED, "balanced", preset_namespace())
    _check_cpu_mixed_precision(balanced["model"], record)
    _check_compile_fell_back(balanced["model"], caplog)
    assert isinstance(balanced["model"].watermarker, perth.PerthImplicitWatermarker)
    capsys.readouterr()

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dev = run_snippet(DEVELOPMENT, "development", preset_namespace())
    model = dev["model"]
    assert not _mixed_precision_warnings(record)
    assert not model.enable_compilation
    assert isinstance(model._step_fn, FusedDecodeStep) if cpu_kernels.available() else model._step_fn is None
    assert isinstance(model.watermarker, perth.PerthImplicitWatermarker)
    assert f"sampling speech tokens: 0/{MAX_NEW_TOKENS}" in capsys.readouterr().err  # verbose=True: progress
    _check_wav(dev["wav"])

    # the compile fall-back decodes exactly like the eager engine: same text, cfg 0.5, seed -> same wav
    assert torch.equal(balanced["wav"], dev["wav"])
    detector = perth.PerthImplicitWatermarker()
    conf = float(detector.get_watermark(dev["wav"].squeeze(0).numpy(), sample_rate=24000, round=False))
    print(f"development preset: {dev['wav'].shape[1]} samples, watermark confidence {conf:.4f}")
    assert conf > 0.5
