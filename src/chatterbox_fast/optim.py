"""Compatibility helpers for the optimisation guide's snippets."""

from __future__ import annotations

from torch import nn


def enable_flash_attention_for_llama(module: nn.Module) -> nn.Module:
    """Kept for the guide's advanced snippet (`enable_flash_attention_for_llama(model.t3.tfmr)`).

    Our T3 already runs every attention through `torch.nn.functional.scaled_dot_product_attention`, which picks
    the flash / memory-efficient kernels on CUDA by itself, so this returns `module` unchanged.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return module
