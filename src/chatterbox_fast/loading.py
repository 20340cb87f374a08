"""Checkpoint I/O: find the five files (local folder or the Hugging Face hub) and build every module strictly.

This is the only place that reads files or downloads; models do math only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .conditioning import Conditionals, VoiceConditioner
from .config import T3Config
from .constants import CKPT_FILES, REPO_ID
from .models.s3gen.s3gen import S3Gen
from .models.s3gen.speech_tokenizer import load_s3_tokenizer
from .models.s3gen.xvector import load_campplus
from .models.t3 import T3, T3_KEYMAP
from .models.voice_encoder import build_voice_encoder
from .text import TextTokenizer
from .weights import load_strict, read_safetensors

logger = logging.getLogger(__name__)

REQUIRED = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json")


@dataclass
class Components:
    t3: T3
    s3gen: S3Gen
    conditioner: VoiceConditioner
    tokenizer: TextTokenizer
    conds: Conditionals | None  # the built-in voice (conds.pt), if the checkpoint has one


def download_checkpoint(repo_id: str = REPO_ID, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Fetch the checkpoint files with huggingface_hub (honours HF_HOME / HF_HUB_OFFLINE); return the folder."""
    from huggingface_hub import hf_hub_download

    path = None
    try:
        for name in CKPT_FILES:
            path = hf_hub_download(repo_id=repo_id, filename=name, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # hub errors come in many types (offline, connection, 404, auth)
        raise RuntimeError(
            f"could not get the Chatterbox checkpoint {repo_id!r} from the Hugging Face hub and it is not in the "
            f"local cache ({type(e).__name__}: {e}). Connect to the internet once, or download the files "
            f"{', '.join(CKPT_FILES)} yourself and use OptimizedChatterboxTTS.from_local(ckpt_dir)."
        ) from e
    return Path(path).parent


def check_checkpoint_dir(ckpt_dir: Path) -> None:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    missing = [f for f in REQUIRED if not (ckpt_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} lacks {', '.join(missing)} "
                                f"(expected the files of the Hugging Face repo {REPO_ID})")


def load_t3(path: Path, device: torch.device, dtype: torch.dtype) -> T3:
    with torch.device("meta"):
        t3 = T3(T3Config())
    load_strict(t3, read_safetensors(path), T3_KEYMAP, name=path.name)
    return t3.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_components(ckpt_dir: Path, device: torch.device, t3_dtype: torch.dtype = torch.float32) -> Components:
    """Every module of the checkpoint, strictly loaded, on `device` (fp32 except T3 at `t3_dtype`)."""
    ckpt_dir = Path(ckpt_dir)
    check_checkpoint_dir(ckpt_dir)
    t3 = load_t3(ckpt_dir / "t3_cfg.safetensors", device, t3_dtype)

    s3_state = read_safetensors(ckpt_dir / "s3gen.safetensors")
    s3gen = S3Gen.from_state(s3_state).to(device)
    s3gen.init_buffers()
    tok = load_s3_tokenizer(s3_state).to(device)
    tok.init_buffers()
    campplus = load_campplus(s3_state).to(device)
    ve = build_voice_encoder(read_safetensors(ckpt_dir / "ve.safetensors")).to(device)
    del s3_state
    for m in (s3gen, tok, campplus, ve):  # inference only: no autograd graphs, ever
        m.eval().requires_grad_(False)

    conds = None
    if (ckpt_dir / "conds.pt").is_file():
        conds = Conditionals.load(ckpt_dir / "conds.pt").to(device)
    return Components(
        t3=t3, s3gen=s3gen, conditioner=VoiceConditioner(ve, tok, campplus, T3Config().prompt_len),
        tokenizer=TextTokenizer.from_file(ckpt_dir / "tokenizer.json"), conds=conds,
    )
