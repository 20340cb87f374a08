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


def tiny_t3(seed: int = 0, std: float = 0.2):
    """A 2-layer T3 (`T3Config.tiny()`) in eval mode with N(0, std) weights drawn after `torch.manual_seed(seed)`
    (the module leaves its parameters to the checkpoint)."""
    import torch

    from chatterbox_fast.config import T3Config
    from chatterbox_fast.models.t3 import T3

    torch.manual_seed(seed)
    model = T3(T3Config.tiny()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def skip_unless_compile_works() -> None:
    """pytest.skip (saying why) where torch.compile (inductor, CPU) cannot run: no C++ compiler, unsupported OS."""
    import pytest
    import torch

    try:
        torch._dynamo.reset()
        out = torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(3))
        assert torch.equal(out, torch.full((3,), 3.0))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torch.compile (inductor, CPU) is unavailable here: {type(err).__name__}: {err}")
