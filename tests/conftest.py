"""Shared test fixtures: the reference oracle (random-weight checkpoint + reference tensors).

The oracle is built by `make oracle` (tests/reference/build.py in the oracle venv). A parity test may skip only
outside CI, and loudly; with CI=true a missing oracle fails the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py

import oracle_paths  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels():
    """Build / load our C++ CPU kernels once, first, as the engine does on CPU: every test then runs the code
    users run (T3's decode attention and the int8 / bf16 linears go through them once loaded). Their own tests
    (tests/test_cpu_kernels.py) fail if the build fails; CHATTERBOX_FAST_CPU_KERNELS=0 runs the suite without."""
    from chatterbox_fast import kernels

    kernels.load()


def _missing(what: Path) -> None:
    msg = (
        f"REFERENCE ORACLE MISSING: {what} is not built. Run `make oracle` "
        f"(builds the reference venv and dumps; cache root {oracle_paths.ROOT})."
    )
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def oracle_ckpt() -> Path:
    """Random-weight checkpoint in the official layout, built by the reference's own modules."""
    path = oracle_paths.ckpt_dir()
    if not oracle_paths.is_built(path):
        _missing(path)
    return path


@pytest.fixture(scope="session")
def oracle_fixture():
    """oracle_fixture(dump, name) -> the dict saved by tests/reference/dumps/<dump>.py as <name>.pt."""

    def load(dump: str, name: str):
        path = oracle_paths.fixture_dir(dump)
        if not oracle_paths.is_built(path):
            _missing(path)
        return torch.load(path / f"{name}.pt", weights_only=True)

    return load


_STATES: dict[str, dict] = {}


@pytest.fixture(scope="session")
def oracle_state(oracle_ckpt):
    """oracle_state(file_name) -> the tensors of one checkpoint file, read once per session."""
    from chatterbox_fast.weights import read_safetensors

    def load(name: str) -> dict:
        if name not in _STATES:
            _STATES[name] = read_safetensors(oracle_ckpt / name)
        return _STATES[name]

    return load


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: small sequential ops (LSTM steps, short convs) on a busy 2-core machine are
    dominated by OpenMP barrier spin-waits with 2 threads (measured 10-50x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
