"""The package's runtime never imports the heavy stacks the reference needs (torchaudio, librosa, transformers,
diffusers). Only the optional Perth watermarker pulls torchaudio / librosa in, lazily, when enable_watermark=True.

Checked in a fresh interpreter (this test process has librosa loaded by other tests), plus a static scan of every
import statement in src/, which also catches imports inside functions that the run does not reach.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chatterbox_fast"
FORBIDDEN = ("torchaudio", "librosa", "transformers", "diffusers")
OPTIONAL = {"perth"}  # imported only inside engine._load_watermarker

_PROBE = r"""
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[2])  # tests/reference, for synth
FORBIDDEN = ("torchaudio", "librosa", "transformers", "diffusers", "perth")
loaded = lambda: sorted(m for m in FORBIDDEN if m in sys.modules)
out = {}
import chatterbox_fast
out["import"] = loaded()
for info in pkgutil.walk_packages(chatterbox_fast.__path__, "chatterbox_fast."):
    importlib.import_module(info.name)
out["all_modules"] = loaded()
out["sympy_before_load"] = "sympy" in sys.modules
import torch
torch.set_num_threads(1)
from chatterbox_fast import OptimizedChatterboxTTS
tts = OptimizedChatterboxTTS.from_local(sys.argv[1], device="cpu", enable_watermark=False)
import synth
with torch.inference_mode():
    tts.prepare_conditionals(synth.speech_like(2.0, 44100, seed=3), sample_rate=44100)
out["engine"] = loaded()
out["sympy_after_load"] = "sympy" in sys.modules
from chatterbox_fast.engine import _load_watermarker  # what enable_watermark=True runs
try:
    _load_watermarker()
    out["watermark"] = loaded()
except ImportError as e:
    out["watermark"] = "unavailable: %s" % e
print("RESULT" + json.dumps(out))
"""


def test_runtime_does_not_import_heavy_stacks(oracle_ckpt):
    ref_dir = Path(__file__).resolve().parent / "reference"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(oracle_ckpt), str(ref_dir)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    print(out)
    assert out["import"] == [], "import chatterbox_fast loaded " + str(out["import"])
    assert out["all_modules"] == [], "importing every chatterbox_fast module loaded " + str(out["all_modules"])
    assert out["engine"] == [], "from_local + prepare_conditionals loaded " + str(out["engine"])
    if not out["sympy_before_load"]:  # (true of torch 2.13: `import torch` leaves sympy out)
        # loading builds every model on the meta device; math on meta tensors (nn.Embedding's normal_ init, a buffer
        # computed in __init__) runs Python meta kernels whose first use imports torch's decomposition stack and
        # sympy: ~2 s per process (weights.embedding, placeholder buffers on meta)
        assert not out["sympy_after_load"], "from_local ran a Python meta kernel (imported sympy)"
    if isinstance(out["watermark"], list):  # the probe can see them: the watermarker does load torchaudio
        assert {"perth", "torchaudio", "librosa"} <= set(out["watermark"])
        assert not {"transformers", "diffusers"} & set(out["watermark"])


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_imports_heavy_stacks(path):
    roots = _imported_roots(path)
    assert not roots & set(FORBIDDEN), f"{path.name} imports {sorted(roots & set(FORBIDDEN))}"
    if roots & OPTIONAL:
        assert path.name == "engine.py", f"{path.name} imports perth (only engine._load_watermarker may)"
