"""Host-memory helpers: give back the pages of memory-mapped checkpoint tensors (Linux), copy results to the host.

Checkpoints are memory-mapped (safetensors), so a weight that is read once and then replaced (T3's linears when they
are converted to int8 / bf16) leaves its file pages resident for as long as the mapping lives, and the mapping lives
as long as any tensor of the file does (the embeddings, the norms...). `release_file_pages` drops the pages of one
such tensor right after its converted copy exists, which keeps a bf16 / int8 load's peak RSS near its final size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from functools import lru_cache

import torch

_MADV_DONTNEED = 4


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _file_mapping(start: int, end: int, suffix: str) -> bool:
    """True when [start, end) lies inside one mapping of a file whose name ends with `suffix`."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].strip().endswith(suffix):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= start and end <= hi:
                return True
    return False


def release_file_pages(t: torch.Tensor, suffix: str = ".safetensors") -> int:
    """Drop the resident pages of a CPU tensor that lives in a memory-mapped `suffix` file; returns the bytes released
    (0 when it is not such a tensor, is not contiguous, or off Linux). Only whole pages inside the tensor's bytes are
    released.

    The caller must own the tensor's data: the checkpoint's private mapping is copy-on-write, so a page written in
    place would go back to the file's bytes; a loader that replaced the tensor by a converted copy and holds no other
    reference is the intended use. A later read of the range would simply fault the file's bytes back in.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return 0
    libc = _libc()
    if libc is None:
        return 0
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor's bytes
    if hi <= lo or not _file_mapping(start, end, suffix):
        return 0
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) != 0:
        return 0
    return hi - lo


def to_host(x: torch.Tensor) -> torch.Tensor:
    """x on the CPU. From a CUDA device: one asynchronous copy into pinned (page-locked) host memory, then a wait on
    the current stream only; the copy engine writes straight into the pinned buffer (a plain `.cpu()` stages it
    through a pageable one). Pinned buffers come from torch's caching host allocator, so requests reuse them.
    Other devices: `x.cpu()` (a no-op on the CPU)."""
    if x.device.type != "cuda":
        return x.cpu()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return out
