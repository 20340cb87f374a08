"""memory: release_file_pages drops the pages of memory-mapped checkpoint tensors only and never changes values;
to_host copies a result to the CPU (pinned memory from CUDA)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from chatterbox_fast.memory import release_file_pages, to_host
from chatterbox_fast.weights import read_safetensors

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")


def _resident_kb(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@linux_only
def test_mapped_tensor_pages_are_released_and_values_kept(tmp_path):
    path = tmp_path / "w.safetensors"
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))  # 4 MiB
    save_file({"w": w, "b": torch.ones(3)}, str(path))
    state = read_safetensors(path)
    assert torch.equal(state["w"], w)  # touches every page
    before = _resident_kb(path)
    assert release_file_pages(state["w"].t()) == 0  # not contiguous: left alone
    released = release_file_pages(state["w"])
    assert released >= 4 * 1024 * 1024 - 2 * 4096
    assert _resident_kb(path) <= before - released // 1024 + 8
    assert torch.equal(state["w"], w)  # faulted back in from the file: same values
    assert torch.equal(state["b"], torch.ones(3))


@linux_only
def test_other_tensors_are_left_alone():
    x = torch.randn(1 << 20)
    y = x.clone()
    assert release_file_pages(x) == 0  # anonymous memory: never madvised
    assert torch.equal(x, y)
    assert release_file_pages(torch.empty(0)) == 0
    assert release_file_pages(torch.randn(10)) == 0


def test_quantize_t3_hands_each_replaced_weight_to_release():
    from helpers import tiny_t3

    from chatterbox_fast.quantize import T3_LAYER_LINEARS, quantize_t3

    model = tiny_t3(0)
    originals = {id(m.weight) for layer in model.tfmr.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    seen = []
    quantize_t3(model, "bf16", release=lambda t: seen.append(id(t)))
    assert len(seen) == len(model.tfmr.layers) * len(T3_LAYER_LINEARS)  # every checkpoint weight, once
    assert set(seen) == originals
    quantize_t3(model, "int8", release=lambda t: seen.append(id(t)))  # already converted: nothing replaced
    assert len(seen) == len(model.tfmr.layers) * len(T3_LAYER_LINEARS)


def test_to_host_cpu_is_the_same_tensor():
    x = torch.randn(1, 7)
    assert to_host(x) is x  # no copy on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_host_from_cuda_is_pinned_and_exact():
    x = torch.randn(1, 24000, device="cuda")
    y = to_host(x * 2)
    assert y.device.type == "cpu" and y.is_pinned()
    assert torch.equal(y, (x * 2).cpu())
