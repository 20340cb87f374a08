"""Build the oracle: random-weight checkpoint + reference fixtures. Run with the ORACLE venv's python:

    $CHATTERBOX_FAST_ORACLE_DIR/venv/bin/python tests/reference/build.py [DUMP ...]

Cached by content keys (oracle_paths.py): a second run does nothing. Each output directory is written to a
temporary name and renamed when complete, so a crash never leaves a half-built cache.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle_paths  # noqa: E402


def _atomic(target: Path, fn) -> None:
    if oracle_paths.is_built(target):
        print(f"[oracle] cached: {target}")
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.perf_counter()
    fn(tmp)
    (tmp / oracle_paths.DONE).write_text("ok\n")
    tmp.rename(target)
    print(f"[oracle] built {target.name} in {time.perf_counter() - t0:.1f} s")


def main(names: list[str]) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    import build_ckpt

    ckpt = oracle_paths.ckpt_dir()
    _atomic(ckpt, build_ckpt.build)
    for name in names or oracle_paths.dump_names():
        mod = importlib.import_module(f"dumps.{name}")
        _atomic(oracle_paths.fixture_dir(name), lambda out, mod=mod: mod.dump(ckpt, out))


if __name__ == "__main__":
    main(sys.argv[1:])
