"""The native modules a build was asked for are importable.

Tests that need a native module skip without it, so a module that builds but fails to import
(a missing symbol, a wrong link) would otherwise turn into a quiet wall of skips. The build
switches are read from the same environment variables that pip's build reads.
"""
import importlib
import os

import pytest


def _switched_on(variable: str) -> bool:
    return os.environ.get(variable, "").strip().upper() in ("ON", "1", "TRUE", "YES")


def requested_modules() -> list:
    modules = ["_cpu"]  # always built
    if _switched_on("FUSEDRNN_EMU"):
        modules.append("_emu")
    if _switched_on("FUSEDRNN_CUDA"):  # AUTO may legitimately build without CUDA
        modules.append("_cuda")
    return modules


@pytest.mark.parametrize("name", requested_modules())
def test_requested_native_module_imports(name):
    module = importlib.import_module(f"fusedrnn.{name}")  # raises with the loader's own message
    for entry in ("FwdParams", "BwdParams", "forward", "backward", "forward_workspace_bytes",
                  "backward_workspace_bytes"):
        assert hasattr(module, entry), f"fusedrnn.{name} lacks {entry}"
