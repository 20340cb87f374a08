"""Helpers shared by the dump scripts (oracle venv)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch


def load_reference(ckpt: Path):
    """The reference model through its real loading path (CPU, fp32)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from chatterbox.tts import ChatterboxTTS

    return ChatterboxTTS.from_local(ckpt, device="cpu")


def save(out: Path, name: str, obj) -> None:
    """torch.save a dict of tensors / numbers / strings, loadable with weights_only=True."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(obj, out / f"{name}.pt")
