"""The whole pipeline against the reference: conditionals from audio files, end-to-end waveform with the
reference's own tokens and randomness, reproducibility, and bad input.

Tolerances (fp32, same weights): speech tokens identical; VE embedding and x-vector <= 1e-4 abs (unit-norm /
O(1) vectors through an LSTM / a deep CNN); prompt mel <= 1e-3 abs on log values (two resamplers and an STFT,
log amplifies tiny differences in near-silent bins); waveform <= 2e-3 abs (10 CFM steps and a vocoder whose
exp-magnitude / iSTFT amplify ~1e-6 mel differences; the waveform is in [-0.99, 0.99]).
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_fast import Conditionals, OptimizedChatterboxTTS, enable_flash_attention_for_llama

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def tts(oracle_ckpt):
    return OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False)


@pytest.mark.parametrize("clip", ["voice_6s_24k", "voice_12s_44k_stereo", "voice_9p5s_24k"])
def test_conditionals_match_reference(tts, oracle_ckpt, oracle_fixture, clip):
    ref = oracle_fixture("pipeline", f"conds_{clip}")
    c = tts.conditioner(str(oracle_ckpt / "clips" / f"{clip}.wav"))
    assert torch.equal(c.t3.prompt_tokens, ref["prompt_tokens"].long())
    assert torch.equal(c.gen.prompt_token, ref["prompt_token"].long())
    assert c.gen.prompt_feat.shape == ref["prompt_feat"].shape
    torch.testing.assert_close(c.gen.prompt_feat, ref["prompt_feat"], atol=1e-3, rtol=0)
    torch.testing.assert_close(c.t3.speaker_emb, ref["speaker_emb"].float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(c.gen.embedding, ref["embedding"].float(), atol=1e-4, rtol=0)


def test_builtin_voice_loads_from_conds_pt(tts, oracle_ckpt, tmp_path):
    c = Conditionals.load(oracle_ckpt / "conds.pt")
    assert c.t3.speaker_emb.shape == (1, 256) and c.gen.embedding.shape == (1, 192)
    assert c.gen.prompt_feat.shape[1] in (2 * c.gen.prompt_token.shape[1], 2 * c.gen.prompt_token.shape[1] + 1)
    c.save(tmp_path / "v.pt")  # round trip in the reference's format
    d = Conditionals.load(tmp_path / "v.pt")
    assert torch.equal(d.gen.prompt_feat, c.gen.prompt_feat) and d.t3.exaggeration == c.t3.exaggeration
    with pytest.raises(FileNotFoundError, match="directory not found"):
        c.save(tmp_path / "no" / "such" / "v.pt")
    for name, data in (("text.pt", b"not a voice\n" * 20), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a Chatterbox voice profile"):
            tts.set_voice(tmp_path / name)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tts.tokens_to_wav([1, 2, 3])


def test_waveform_matches_reference_with_same_tokens_and_noise(tts, oracle_ckpt, oracle_fixture):
    ref = oracle_fixture("pipeline", "generate")
    tts.set_voice(oracle_ckpt / "conds.pt")
    torch.set_rng_state(ref["rng_state"])  # the reference's CFM noise, then HiFT phases and noise
    wav = tts.tokens_to_wav(ref["speech_tokens"].long())
    want = ref["wav_before_watermark"].float().reshape(1, -1)
    assert wav.shape == want.shape
    err = (wav - want).abs().max().item()
    print(f"end-to-end waveform: {wav.shape[1]} samples, max abs err {err:.2e}")
    assert err <= 2e-3


def test_generate_is_reproducible_with_a_seed(tts, oracle_ckpt):
    tts.set_voice(oracle_ckpt / "conds.pt")
    mine = [v[2] for v in tts._prefixes.values() if v[0] is tts.conds.t3.speaker_emb]
    assert len(mine) == 1 and mine[0].length == 33 and mine[0].slots is not None  # computed with the voice
    a = tts.generate("Seeded run.", max_new_tokens=8, seed=11)
    b = tts.generate("Seeded run.", max_new_tokens=8, seed=11)
    assert a.dtype == torch.float32 and a.dim() == 2 and a.shape[0] == 1
    assert torch.equal(a, b)  # both restored the voice's T3 prefix
    # cfg_weight=0 (which crashes the reference) works
    c = tts.generate("No guidance.", cfg_weight=0.0, max_new_tokens=8, seed=1)
    assert c.shape[0] == 1


def test_threads_sharing_an_engine_get_what_sequential_calls_get(tts, oracle_ckpt):
    """One engine, three threads at once: the engine's lock runs the requests one after another (they share one KV
    cache and decode state), so each output equals the same request run alone."""
    tts.set_voice(oracle_ckpt / "conds.pt")
    jobs = [("First thread.", 3), ("The second thread has a longer text.", 4), ("Third.", 5)]
    want = [tts.generate(text, max_new_tokens=6, seed=seed) for text, seed in jobs]
    got, errors = [None] * len(jobs), []

    def run(i):
        try:
            got[i] = tts.generate(jobs[i][0], max_new_tokens=6, seed=jobs[i][1])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("text, exc", [
    ("", ValueError), ("   \n\t ", ValueError), ("x" * 100_000, ValueError), ("bell\x07ring", ValueError),
    (None, TypeError), (42, TypeError),
])
def test_bad_text_is_rejected_clearly(tts, text, exc):
    with pytest.raises(exc):
        tts.generate(text, max_new_tokens=4)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_p=2.0), dict(min_p=-1), dict(cfg_weight=-1),
                                dict(repetition_penalty=0), dict(max_new_tokens=0), dict(exaggeration=-1),
                                dict(cfm_steps=0), dict(cfm_steps=2.5), dict(cfm_steps=True), dict(cfm_steps=101),
                                dict(seed="x"), dict(seed=1.5), dict(seed=True), dict(seed=2 ** 70),
                                dict(max_new_tokens=4097), dict(max_new_tokens=10 ** 9)])
def test_bad_parameters_are_rejected(tts, kw):
    with pytest.raises(ValueError):
        tts.generate("Fine text.", **kw)


def test_cfm_steps_is_opt_in(tts, oracle_ckpt, oracle_fixture):
    """None and 10 give the exact (reference) waveform; fewer steps give another one of the same length."""
    ref = oracle_fixture("pipeline", "generate")
    tts.set_voice(oracle_ckpt / "conds.pt")
    tokens = ref["speech_tokens"].long()[:20]
    outs = {}
    for n in (None, 10, 4):
        outs[n] = tts.tokens_to_wav(tokens, generator=torch.Generator().manual_seed(3), cfm_steps=n)
    assert torch.equal(outs[None], outs[10])
    assert outs[4].shape == outs[10].shape
    assert (outs[4] - outs[10]).abs().max() > 1e-3


def _write(path, wav, sr, subtype="FLOAT"):
    sf.write(path, wav, sr, subtype=subtype)
    return str(path)


def test_bad_audio_is_rejected_clearly_and_the_model_still_works(tts, tmp_path, oracle_ckpt):
    rng = np.random.default_rng(0)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    cases = [
        (str(tmp_path / "missing.wav"), FileNotFoundError),
        (str(not_audio), ValueError),
        (_write(tmp_path / "short.wav", 0.1 * rng.standard_normal(2400).astype(np.float32), 24000), ValueError),
        (_write(tmp_path / "silent.wav", np.zeros(48000, np.float32), 24000), ValueError),
    ]
    for path, exc in cases:
        with pytest.raises(exc):
            tts.prepare_conditionals(path)
    # odd formats that must simply work: 8 kHz stereo int16, 48 kHz float
    import synth

    speech = synth.speech_like(3.0, 8000, seed=9)
    stereo = np.stack([speech, 0.5 * speech], axis=1)
    c8 = tts.prepare_conditionals(_write(tmp_path / "st8k.wav", stereo, 8000, "PCM_16"))
    c48 = tts.prepare_conditionals(_write(tmp_path / "f48k.wav", synth.speech_like(3.0, 48000, seed=9), 48000))
    for c in (c8, c48):
        assert c.t3.prompt_tokens.shape[1] == 75 and c.gen.prompt_feat.shape[1] == 150
        assert torch.isfinite(c.gen.embedding).all() and torch.isfinite(c.t3.speaker_emb).all()
    wav = tts.generate("Still working.", max_new_tokens=6, seed=0)
    assert wav.shape[0] == 1 and torch.isfinite(wav).all()


def test_guide_helpers():
    m = torch.nn.Linear(2, 2)
    assert enable_flash_attention_for_llama(m) is m
    with pytest.raises(TypeError):
        enable_flash_attention_for_llama("not a module")


def test_from_local_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="t3_cfg.safetensors"):
        OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", enable_watermark=False)


def test_from_local_reports_a_corrupt_checkpoint_file(tmp_path, oracle_ckpt):
    """A truncated or empty safetensors file: CheckpointError naming the file, not safetensors' own error."""
    from chatterbox_fast.weights import CheckpointError

    for f in oracle_ckpt.iterdir():
        (tmp_path / f.name).symlink_to(f)
    for data in (b"", (oracle_ckpt / "t3_cfg.safetensors").open("rb").read(100_000)):
        (tmp_path / "t3_cfg.safetensors").unlink()
        (tmp_path / "t3_cfg.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match=r"cannot read .*t3_cfg\.safetensors.*download again"):
            OptimizedChatterboxTTS.from_local(tmp_path, device="cpu", enable_watermark=False)


def test_watermark_without_perth_fails_at_load_with_a_hint(oracle_ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "perth", None)  # `import perth` raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"chatterbox-fast\[watermark\]"):
        OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=True)


def test_speculative_decoding_gives_the_same_tokens_and_waveform(tts, oracle_ckpt):
    """speculative="auto" (the default: "int8" here): an int8 draft proposes, fp32 T3 decides; the tokens, the
    generator state and so the waveform are the plain loop's (speculative=None), bit for bit
    (tests/generation/test_speculative.py for the why)."""
    from chatterbox_fast import kernels

    if not (kernels.available() and kernels.isa() in ("avx512", "avx2")):
        pytest.skip("the fused CPU step needs the AVX-512 / AVX2 kernels")
    assert tts._speculative is not None  # auto chose it
    plain = OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False, speculative=None)
    assert plain._speculative is None
    for e in (tts, plain):
        e.set_voice(oracle_ckpt / "conds.pt")
    p = dict(max_new_tokens=14, seed=4)
    assert torch.equal(tts.generate("Same words, fewer passes.", **p), plain.generate("Same words, fewer passes.", **p))
    st = tts.speculative_stats
    assert st["tokens"] > 0 and st["rounds"] == sum(st["k_rounds"].values()) and plain.speculative_stats is None
    assert not tts.t3.caches_allocated and not tts._speculative.draft.caches_allocated  # both freed after T3


def test_speculative_needs_fp32_or_bf16_weight_t3_unless_auto(oracle_ckpt):
    with pytest.raises(ValueError, match="speculative"):
        OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False, speculative="int4")
    with pytest.raises(ValueError, match="fp32 or bf16-weight T3"):
        OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False, speculative="int8",
                                          quantize="int8")
    q = OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False, quantize="int8")
    assert q._speculative is None  # auto: off where it does not apply, silently
    from chatterbox_fast import kernels

    if kernels.available() and kernels.isa() in ("avx512", "avx2"):  # bf16 weights: on request only
        b = OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False, quantize="bf16")
        assert b._speculative is None
        b = OptimizedChatterboxTTS.from_local(oracle_ckpt, device="cpu", enable_watermark=False, quantize="bf16",
                                              speculative="int8")
        assert b._speculative is not None and b._speculative.draft is not None
