"""The `chatterbox-fast speak` command writes a valid 24 kHz wav (random test weights: noise, and it says so)."""

from __future__ import annotations

import pytest
import soundfile as sf

from chatterbox_fast import kernels
from chatterbox_fast.cli import main


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        main(["speak", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--voice", "--ckpt-dir", "--seed", "--cfg-weight", "--no-watermark", "--exaggeration", "--cfm-steps",
                 "--s3gen-quantize", "--speculative"):
        assert flag in out


def test_speak_writes_a_24k_wav(oracle_ckpt, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    rc = main(["speak", "Hello from the command line.", "-o", str(out), "--ckpt-dir", str(oracle_ckpt),
               "--device", "cpu", "--no-watermark", "--max-new-tokens", "6", "--seed", "0", "--cfm-steps", "4",
               "--s3gen-quantize", "int8-attn" if kernels.load() and kernels.int8_attention_ready() else "int8",
               *(["--speculative", "int8"] if kernels.load() and kernels.isa() in ("avx512", "avx2")
                 else ["--speculative", "off"])])
    assert rc == 0
    info = sf.info(out)
    assert info.samplerate == 24000 and info.channels == 1 and info.frames > 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err


def test_speak_reports_bad_input_without_a_traceback(oracle_ckpt, tmp_path, capsys):
    rc = main(["speak", "", "-o", str(tmp_path / "x.wav"), "--ckpt-dir", str(oracle_ckpt), "--device", "cpu",
               "--no-watermark"])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_speak_rejects_an_unknown_output_format_before_loading(tmp_path, capsys):
    """The output format comes from the extension and is checked before any work (no checkpoint is even read)."""
    for name in ("x.xyz", "noext"):
        rc = main(["speak", "hi", "-o", str(tmp_path / name), "--ckpt-dir", str(tmp_path / "missing")])
        assert rc == 2 and "unknown audio format" in capsys.readouterr().err


def test_output_subtype_follows_the_format():
    from pathlib import Path

    from chatterbox_fast.cli import _output_subtype

    assert _output_subtype(Path("a.wav")) == _output_subtype(Path("b.FLAC")) == "PCM_16"
    assert _output_subtype(Path("c.ogg")) == "VORBIS"
