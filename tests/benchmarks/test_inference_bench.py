"""benchmarks/inference.py: its core (run_mode) on a tiny engine in a few seconds, the forced fixed length, the
weight-byte count, an unavailable mode, and the summary / table. Real timings come from the script, not from here.

The tiny engine is the real `OptimizedChatterboxTTS` around a tiny random T3 (the real generation loop, sampler and
per-token hook) and a stand-in S3Gen that returns silence of the right length (its flow / HiFT are timed, not
checked, by the benchmark).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from chatterbox_fast import OptimizedChatterboxTTS
from chatterbox_fast import kernels as cpu_kernels
from chatterbox_fast.conditioning import Conditionals, GenCond, T3Cond
from chatterbox_fast.constants import STOP_SPEECH
from chatterbox_fast.generation.decode import generate_tokens
from chatterbox_fast.generation.sampling import SamplingParams
from chatterbox_fast.loading import Components
from chatterbox_fast.models.t3 import T3

import helpers

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "inference.py"
sys.path.insert(0, str(_PATH.parent))  # its `import common`
_spec = importlib.util.spec_from_file_location("benchmarks_inference", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

torch.set_grad_enabled(False)


class _Flow(nn.Module):
    def inference(self, tokens, prompt_token, prompt_feat, embedding, generator=None, **_):
        return torch.zeros(1, 80, 2 * tokens.numel())  # 2 mel frames per token


class _HiFT(nn.Module):
    def forward(self, mel, phases=None, noise=None, generator=None):
        return torch.zeros(1, 480 * mel.shape[-1]), None  # 480 samples per frame


class _S3Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.flow, self.mel2wav = _Flow(), _HiFT()

    def inference(self, speech_tokens, prompt_token, prompt_feat, embedding, generator=None, **_):
        mel = self.flow.inference(speech_tokens, prompt_token, prompt_feat, embedding, generator=generator)
        return self.mel2wav(mel, None, None, generator=generator)[0]


class _Tokenizer:
    def prepare(self, text):
        return SimpleNamespace(ids=torch.tensor([[255, 10, 11, 12, 2, 13, 0]]))


def tiny_t3() -> T3:
    return helpers.tiny_t3()


def tiny_loader(ckpt, device, options):
    conds = Conditionals(T3Cond(torch.randn(1, 256), torch.randint(0, 6561, (1, 20)), 0.5),
                         GenCond(torch.randint(0, 6561, (1, 10)), torch.randn(1, 20, 80), torch.randn(1, 192)))
    parts = Components(t3=tiny_t3(), s3gen=_S3Gen(), conditioner=None, tokenizer=_Tokenizer(), conds=conds)
    return OptimizedChatterboxTTS(parts, torch.device(device), enable_watermark=False, **options)


def _args(**kw):
    base = dict(device="cpu", tokens=12, iters=1, text="hello", seed=0, prompt_tokens=0, bandwidth_mb=8,
                ckpt=Path("tiny"))
    base.update(kw)
    return SimpleNamespace(**base)


def test_run_mode_on_tiny_engine():
    result, saves = {}, []
    bench.run_mode("eager-fp32", _args(), result, save=lambda: saves.append(json.dumps(result, default=str)),
                   loader=tiny_loader)
    assert result["status"] == "ok" and len(saves) >= 5  # saved stage by stage
    n = 12
    t3 = result["t3"]
    assert t3["tokens_generated"] == n and not t3["stopped_early"]
    assert t3["decode_steps_per_request"] == n - 1 and t3["decode_ms_per_token"]["n"] == n - 1
    assert result["s3gen"]["speech_tokens"] == n and result["s3gen"]["mel_frames"] == 2 * n
    assert result["e2e"]["audio_s"] == pytest.approx(n * 0.04)  # fixed length: 960 samples per token at 24 kHz
    for key in ("load_s", "first_request_s", "achieved_gbs", "floor_ms_per_token", "roofline_ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["t3_weight_bytes"] == sum(result["t3_weight_bytes_by_dtype"].values())
    assert set(result["stages"]) == {"t3_prefill_ms", "t3_decode_ms", "flow_ms", "hift_ms"}
    assert all(v >= 0 for v in result["stages"].values())
    assert result["memory"]["peak_rss_gb"] > 0
    # CPU: the fused C++ decode step where our kernels are built (AVX-512 / AVX2), else the eager module path
    fused = cpu_kernels.available() and cpu_kernels.isa() in ("avx512", "avx2")
    assert result["engine"]["step_fn"] == ("FusedDecodeStep" if fused else "decode_one_token (eager)")
    json.dumps(result, default=str)  # serialisable


def test_fixed_length_keeps_every_token_even_when_stop_always_wins():
    t3 = tiny_t3()
    plain = t3.speech_logits

    def stop_wins(h):
        logits = plain(h)
        logits[:, STOP_SPEECH] = 100.0
        return logits

    t3.speech_logits = stop_wins
    cond = t3.cond_embeds(torch.randn(1, 256), torch.randint(0, 6561, (1, 20)), torch.tensor([0.5]))
    x = t3.prefill_embeds(cond, torch.tensor([[255, 10, 11, 0]]), cfg_batch=True)
    p = SamplingParams(max_new_tokens=10)
    assert generate_tokens(t3, x, p).shape[1] == 1  # the stop token ends it at once
    import chatterbox_fast.engine as engine_mod

    with bench.fixed_length():
        raw = generate_tokens(t3, x, p)
        clean = engine_mod.clean_speech_tokens(raw)
    assert raw.shape[1] == 10 and clean.numel() == 10 and int(clean.max()) < 6561
    assert engine_mod.clean_speech_tokens(raw).numel() == 0  # restored: the engine's clean-up again


def test_weight_bytes_follow_dtypes():
    t3 = tiny_t3()
    cfg = t3.cfg
    per_layer = 4 * cfg.dim * cfg.n_heads * cfg.head_dim + 3 * cfg.dim * cfg.intermediate_size + 2 * cfg.dim
    numel = cfg.n_layers * per_layer + cfg.dim + cfg.speech_vocab_size * cfg.dim
    t3.setup_caches(2, 64)  # the KV caches are not weights
    total, by_dtype = bench.t3_weight_bytes(t3)
    assert total == 4 * numel and by_dtype == {"torch.float32": 4 * numel}
    total16, by16 = bench.t3_weight_bytes(t3.to(torch.bfloat16))
    assert total16 == 2 * numel and set(by16) == {"torch.bfloat16"}


def test_unavailable_mode_is_recorded(monkeypatch):
    monkeypatch.setattr(bench, "supports_quantize", lambda: False)
    result = {}
    bench.run_mode("eager-int8", _args(), result, loader=tiny_loader)
    assert result["status"] == "not available" and "quantize" in result["reason"]


def test_summary_and_table(capsys):
    result = {}
    bench.run_mode("eager-fp32", _args(tokens=4), result, loader=tiny_loader)
    modes = {"eager-fp32": result, "compiled-int8": {"status": "error", "error": "boom"}}
    rows = bench.summary_rows(modes)
    assert rows[0]["ms_per_token"] == result["t3"]["decode_ms_per_token"]["median"]
    assert rows[1]["status"] == "error" and rows[1]["ms_per_token"] is None
    bench.print_table(rows, "cpu")
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "ERROR: boom" in out and "eager-fp32" in out


def test_modes_parse():
    assert set(bench.MODES) == {f"{c}-{p}" for c in ("eager", "compiled") for p in ("fp32", "bf16", "int8")} | {
        "compiled-int8-flowint8", "compiled-int8-flowint8attn", "compiled-int8-flowbf16", "eager-int8-kv8"}
    assert bench.MODES["compiled-int8-flowint8attn"]["s3gen_quantize"] == "int8-attn"
    assert bench.MODES["compiled-int8-flowbf16"]["s3gen_quantize"] == "bf16"
    assert bench.MODES["eager-int8-kv8"] == {"enable_compilation": False, "quantize": "int8", "kv_cache": "int8"}
    assert bench.MODES["compiled-int8"] == {"enable_compilation": True, "quantize": "int8"}
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "eager-fp64", "--ckpt", "/nonexistent"])


def test_main_in_process_writes_json(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "t3_cfg.safetensors").write_bytes(b"")  # parse_args checks the folder; the loader is the tiny one
    monkeypatch.setattr(bench, "load_engine", tiny_loader)
    monkeypatch.setattr(bench, "supports_quantize", lambda: False)
    out = tmp_path / "r.json"
    rc = bench.main(["--device", "cpu", "--ckpt", str(ckpt), "--modes", "eager-fp32,eager-int8", "--tokens", "6",
                     "--iters", "2", "--bandwidth-mb", "8", "--in-process", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert "RANDOM WEIGHTS" in data["note"] and data["machine"]["torch_version"] == torch.__version__
    assert data["settings"]["tokens"] == 6 and data["settings"]["iters"] == 2
    assert data["modes"]["eager-fp32"]["status"] == "ok" and data["modes"]["eager-int8"]["status"] == "not available"
    assert data["modes"]["eager-fp32"]["t3"]["decode_ms_per_token"]["n"] == 2 * 5  # 2 requests x 5 steps
    assert [r["mode"] for r in data["summary"]] == ["eager-fp32", "eager-int8"]
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
