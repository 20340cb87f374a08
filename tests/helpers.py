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


def require_cpu_kernels() -> None:
    """Skip (CHATTERBOX_FAST_CPU_KERNELS=0) or load our C++ CPU kernels, failing with the build's error."""
    import os

    import pytest

    from chatterbox_fast import kernels

    if os.environ.get("CHATTERBOX_FAST_CPU_KERNELS", "1") == "0":
        pytest.skip("disabled by CHATTERBOX_FAST_CPU_KERNELS=0")
    assert kernels.load(), kernels.error()


def tiny_t3_as(fmt: str | None, kv_dtype=None):
    """tiny_t3(0) in a fused-step layout. fmt: None (fp32, fused projections), "int8", "bf16", or either +
    "-packed" (the engine's layout for the fused step); kv_dtype: the KV cache's (None: fp32)."""
    from chatterbox_fast.quantize import pack_t3, quantize_t3

    model = tiny_t3(0)
    if fmt is None:
        model.fuse_projections()
    else:
        quantize_t3(model, fmt.removesuffix("-packed"))
        if fmt.endswith("-packed"):
            assert pack_t3(model) == 4 * model.cfg.n_layers
    model.kv_dtype = kv_dtype
    return model


def kv_caches(model) -> list:
    """Every layer's k and v cache tensors, in order."""
    return [c for lay in model.tfmr.layers for c in (lay.self_attn.kv_cache.k_cache, lay.self_attn.kv_cache.v_cache)]


def tiny_estimator(head_dim: int):
    """A small S3Gen CFM estimator (64 channels, 1 down / 1 mid / 1 up stage of 1 transformer block, 2 heads of
    `head_dim`), weights N(0, 0.2) under a fixed seed, in eval mode."""
    import torch

    from chatterbox_fast.models.s3gen.estimator import ConditionalDecoder, EstimatorConfig

    cfg = EstimatorConfig(channels=64, n_blocks=1, num_mid_blocks=1, num_heads=2, head_dim=head_dim,
                          time_embed_dim=64)
    torch.manual_seed(0)
    est = ConditionalDecoder(cfg)
    for p in est.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return est.eval()


def estimator_case(head_dim: int, frames: int = 37):
    """(tiny_estimator(head_dim), h (2, frames, 320), t_emb (2, 64)): the packed input and time embedding of one
    estimator call, from a fixed seed."""
    import torch

    est = tiny_estimator(head_dim)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, frames, 320, generator=g)
    return est, h, est.embed_time(torch.rand(2, generator=g))
