"""`from_pretrained` without a network (HF_HUB_OFFLINE=1, read by huggingface_hub at import, hence subprocesses):
an empty cache gives a clear error that points to `from_local`; a filled Hugging Face cache loads with no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from chatterbox_fast.constants import CKPT_FILES, REPO_ID

_PROBE = r"""
import sys
import torch
from chatterbox_fast import OptimizedChatterboxTTS
try:
    tts = OptimizedChatterboxTTS.from_pretrained(device="cpu", cache_dir=sys.argv[1], enable_watermark=False)
except Exception as e:
    print(f"ERROR {type(e).__name__}: {e}")
    sys.exit(3)
print("LOADED", tts.conds is not None)
"""


def _run(cache_dir: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", _PROBE, str(cache_dir)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_offline_with_an_empty_cache_says_to_use_from_local(tmp_path):
    r = _run(tmp_path / "hub", tmp_path / "hf_home")
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    err = r.stdout
    assert err.startswith("ERROR RuntimeError:"), err
    assert "from_local" in err and REPO_ID in err
    for name in CKPT_FILES:
        assert name in err


def test_offline_with_a_filled_cache_loads(tmp_path, oracle_ckpt):
    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}
    commit = "0" * 40
    repo = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in CKPT_FILES:
        (snap / name).symlink_to(oracle_ckpt / name)
    r = _run(tmp_path / "hub", tmp_path / "hf_home")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.startswith("LOADED True"), r.stdout
