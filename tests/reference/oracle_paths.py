"""Where the reference oracle lives. Standard library only: imported by the oracle venv *and* the test venv.

Everything the oracle builds is cached under ROOT by a key made of the hashes of the scripts that build it (the
versions of the reference stack are pinned in setup_oracle.sh, which is part of every key), so a repeated run is
a no-op and any change to a build script rebuilds exactly what depends on it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("CHATTERBOX_FAST_ORACLE_DIR") or Path.home() / ".cache" / "chatterbox-fast" / "oracle")
DONE = "DONE"  # marker file written last, after an atomic rename

_CKPT_SOURCES = ("setup_oracle.sh", "oracle_paths.py", "build_ckpt.py", "synth.py")


def _digest(names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:12]


def venv_python() -> Path:
    return ROOT / "venv" / "bin" / "python"


def ckpt_dir() -> Path:
    """Random-weight checkpoint in the official file layout (+ `clips/` of synthetic reference audio)."""
    return ROOT / f"ckpt-{_digest(_CKPT_SOURCES)}"


def dump_names() -> list[str]:
    return sorted(p.stem for p in (HERE / "dumps").glob("*.py") if not p.name.startswith("_"))


def fixture_dir(name: str) -> Path:
    """Reference tensors dumped by `dumps/<name>.py` on the checkpoint of `ckpt_dir()`."""
    sources = _CKPT_SOURCES + ("dumps/_common.py", f"dumps/{name}.py")
    return ROOT / f"fixtures-{name}-{_digest(sources)}"


def is_built(path: Path) -> bool:
    return (path / DONE).is_file()


if __name__ == "__main__":
    print(ckpt_dir())
