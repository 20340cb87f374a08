"""Small shared test helpers (not fixtures)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def spec_keys(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Key -> shape from the vendored spec key list tests/data/keys/<name>.keys.txt."""
    out = {}
    for line in (DATA / "keys" / f"{name}.keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        if key.startswith(prefix):
            out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out
