"""scripts/install_test_extras.sh, the torchaudio workaround part (SKIP_INSTALL=1: no registry access), on throwaway
venvs: torchaudio absent, a torchaudio whose compiled extension fails to load (a stand-in that raises like the CUDA
build does beside the CPU torch), and one that imports fine. The script must be idempotent and touch nothing that
works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_test_extras.sh"
SO_FILES = ("_torchaudio.abi3.so", "libtorchaudio.abi3.so", "torchaudio_prefixctc.abi3.so")

_BROKEN_INIT = """\
import os
_lib = os.path.join(os.path.dirname(__file__), "lib")
if any(f.endswith(".so") for f in os.listdir(_lib)):
    raise OSError("libc10_cuda.so: cannot open shared object file: No such file or directory")
"""


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    path = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path


def _site(venv: Path) -> Path:
    py = venv / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _fake_torchaudio(site: Path, init: str) -> Path:
    pkg = site / "torchaudio"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    (pkg / "transforms.py").write_text("")
    (pkg / "lib" / "__init__.py").write_text("")
    for name in SO_FILES:
        (pkg / "lib" / name).write_bytes(b"\x7fELF not really")
    return pkg


def _run(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(venv)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SKIP_INSTALL": "1"})


def test_without_torchaudio_nothing_happens(base_venv):
    r = _run(base_venv)
    assert r.returncode == 0, r.stderr
    assert "not installed" in r.stdout


def test_broken_extension_is_moved_aside_once(base_venv):
    pkg = _fake_torchaudio(_site(base_venv), _BROKEN_INIT)
    try:
        r = _run(base_venv)
        assert r.returncode == 0, r.stderr
        assert "disabling" in r.stdout
        assert not list((pkg / "lib").glob("*.so"))
        assert sorted(p.name for p in (pkg / "lib.disabled").iterdir()) == sorted(SO_FILES)
        again = _run(base_venv)  # idempotent
        assert again.returncode == 0 and "left as is" in again.stdout
        assert sorted(p.name for p in (pkg / "lib.disabled").iterdir()) == sorted(SO_FILES)
    finally:
        shutil.rmtree(pkg)


def test_working_torchaudio_is_left_alone(base_venv):
    pkg = _fake_torchaudio(_site(base_venv), "")
    try:
        r = _run(base_venv)
        assert r.returncode == 0, r.stderr
        assert "left as is" in r.stdout
        assert sorted(p.name for p in (pkg / "lib").glob("*.so")) == sorted(SO_FILES)
        assert not (pkg / "lib.disabled").exists()
    finally:
        shutil.rmtree(pkg)


def test_project_venv_has_a_working_watermarker():
    """This interpreter's venv after `make venv`: torchaudio imports and perth's watermarker is there."""
    if not (Path(sys.prefix) / "bin" / "python").exists() or sys.prefix == sys.base_prefix:
        pytest.skip("not running from a virtual environment")
    r = _run(Path(sys.prefix))
    assert r.returncode == 0, r.stdout + r.stderr
    if "perth watermarker importable" not in r.stdout:
        msg = f"resemble-perth is not installed in {sys.prefix}: run scripts/install_test_extras.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)

