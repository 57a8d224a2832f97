"""Shared pytest fixtures.

`backend`: the native module a kernel-level test runs on. 'cpu' always (skipped if _cpu is not
built); 'emu' when fusedrnn._emu is built (FUSEDRNN_BACKEND=emu; tests keep its shapes tiny);
'cuda' when a GPU and fusedrnn._cuda are present (tensors move to the GPU).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"fusedrnn.{name}")
        return True
    except ImportError:
        return False


@dataclass(frozen=True)
class Backend:
    name: str                 # 'cpu', 'emu' or 'cuda'
    device: torch.device      # where the kernel's tensors live
    tiny: bool                # emulated: keep shapes tiny (each emulated sync is slow)


_BACKENDS = ["cpu"]
if _importable("_emu"):
    _BACKENDS.append("emu")
if torch.cuda.is_available() and _importable("_cuda"):
    _BACKENDS.append(pytest.param("cuda", marks=pytest.mark.cuda))


@pytest.fixture(autouse=True)
def _poisoned_workspaces(monkeypatch):
    """Every native workspace starts as 0xFF bytes (NaN in every float type, -1 in every
    integer): a kernel that reads scratch it did not write gives NaN, on every backend, instead
    of whatever the allocator's last user left there."""
    from fusedrnn import _backend
    allocate = _backend.new_workspace
    monkeypatch.setattr(_backend, "new_workspace",
                        lambda nbytes, device: allocate(nbytes, device).fill_(0xFF))


@pytest.fixture
def isa(request, monkeypatch) -> str:
    """An instruction set's build of the CPU kernels, chosen through FUSEDRNN_CPU_ISA (parametrize
    it with indirect=True). Skipped where this CPU does not run that build: the dispatch would
    lower it to one another parameter already runs, and report it as passed."""
    cpu = pytest.importorskip("fusedrnn._cpu")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", request.param)
    if cpu.isa() != request.param:
        pytest.skip(f"this CPU does not run the {request.param} build (it runs {cpu.isa()})")
    return request.param


@pytest.fixture(params=_BACKENDS)
def backend(request, monkeypatch) -> Backend:
    name = request.param
    if name == "cpu" and not _importable("_cpu"):
        pytest.skip("fusedrnn._cpu is not built (build the _cpu target)")
    monkeypatch.setenv("FUSEDRNN_BACKEND", "emu" if name == "emu" else "cpu")
    device = torch.device("cuda" if name == "cuda" else "cpu")
    return Backend(name=name, device=device, tiny=name == "emu")
