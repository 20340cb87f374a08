"""Strict checkpoint loading: one key-map table per checkpoint, no silent partial loads.

A `KeyMap` says how the keys of a checkpoint file map onto a module's `state_dict()`:
  - `prefix`: only keys under this prefix belong to the module (the prefix is stripped);
  - `rename`: regex substitutions applied to the stripped key, in order;
  - `drop`: regexes of keys that are deliberately not loaded (training-only tensors), matched on the stripped key;
  - `elsewhere`: prefixes (of the *full* key) consumed by another module of the same file; `check_file_consumed`
    verifies that a whole file is accounted for by a set of key maps.
Every other key must match a module key with the same shape, and every module key must be supplied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint does not match the module it is loaded into."""


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim); built on the meta device (as the loaders build every model before assigning the
    checkpoint's tensors) it skips its random init: nn.Embedding's normal_ on meta is a Python meta kernel whose first
    call imports torch's decomposition stack (~2 s per process, measured), for values that are replaced anyway."""
    if torch.empty(0).is_meta:  # inside `with torch.device("meta")`
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


@dataclass(frozen=True)
class KeyMap:
    prefix: str = ""
    rename: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    elsewhere: tuple[str, ...] = ()

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix) and not any(key.startswith(p) for p in self.elsewhere)

    def dropped(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.drop)

    def map_key(self, key: str) -> str:
        for pat, rep in self.rename:
            key = re.sub(pat, rep, key)
        return key


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU (memory-mapped by safetensors). FileNotFoundError when missing,
    CheckpointError when unreadable (a truncated download, another format)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors' own error type (a Rust exception) or an OSError
        raise CheckpointError(f"cannot read {path} as safetensors ({e}); a truncated or corrupt download? Delete it "
                              "and download again") from e


def map_state(
    state: Mapping[str, torch.Tensor],
    keymap: KeyMap,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply `keymap` (and an optional whole-dict transform, e.g. weight-norm folding) to a checkpoint."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not keymap.owns(key):
            continue
        k = key[len(keymap.prefix):]
        if keymap.dropped(k):
            continue
        k = keymap.map_key(k)
        if k in out:
            raise CheckpointError(f"two checkpoint keys map to {k!r} (second: {key!r})")
        out[k] = value
    return transform(out) if transform is not None else out


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    keymap: KeyMap = KeyMap(),
    *,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    name: str = "checkpoint",
    dtype: torch.dtype | None = None,
) -> None:
    """Load `state` into `module` through `keymap`; fail with the names of missing/unexpected/mis-shaped keys.

    Works for modules built on the meta device (tensors are assigned, not copied).
    """
    mapped = map_state(state, keymap, transform)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(mapped) & set(expected)
        if tuple(mapped[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{name} does not match {type(module).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    if dtype is not None:
        mapped = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in mapped.items()}
    else:
        # keep each tensor at the dtype the module declares (e.g. fp32 file into fp32 module)
        mapped = {k: v.to(expected[k].dtype) if v.dtype != expected[k].dtype else v for k, v in mapped.items()}
    module.load_state_dict(mapped, strict=True, assign=True)


def check_file_consumed(state: Mapping[str, torch.Tensor], keymaps: Iterable[KeyMap], name: str) -> None:
    """Every key of a file is owned by one of `keymaps` (loaded or explicitly dropped): nothing is ignored."""
    keymaps = list(keymaps)
    orphans = sorted(k for k in state if not any(km.owns(k) for km in keymaps))
    if orphans:
        shown = ", ".join(orphans[:20]) + (f", ... ({len(orphans)} in all)" if len(orphans) > 20 else "")
        raise CheckpointError(f"{name}: keys not consumed by any module: {shown}")
