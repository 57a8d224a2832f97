"""The native modules a build was asked for are importable.

Tests that need a native module skip without it, so a module that builds but fails to import
(a missing symbol, a wrong link) would otherwise turn into a quiet wall of skips. The build
switches are read from the same environment variables that pip's build reads.
"""
import importlib
import os
import struct

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


def _dynamic_symbol_names(image: bytes) -> bytes:
    """The .dynstr section (the exported symbols' names) of an ELF64 little-endian image, or
    b"" for another format."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        return b""
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)

    def section(index):  # (name offset, file offset, size)
        base = shoff + index * shentsize
        name, = struct.unpack_from("<I", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if image[names_at + name:names_at + name + 8] == b".dynstr\0":
            return image[offset:offset + size]
    return b""


def test_cpu_micro_kernel_is_inlined():
    """The CPU product's micro-kernel (PanelGemm::kernel and its steps) is compiled into the loop
    that calls it. Out of line, its accumulators went through memory at every multiply-add and
    the LSTM forward ran 1.8x slower (fixed in e2644d1), with every test still passing: so the
    build is checked here, by the absence of any PanelGemm function among the module's exported
    symbols (an out-of-line template instance is exported)."""
    cpu = importlib.import_module("fusedrnn._cpu")
    with open(cpu.__file__, "rb") as library:
        names = _dynamic_symbol_names(library.read())
    if not names:
        pytest.skip("not an ELF64 little-endian module")
    assert b"PanelGemm" not in names, (
        "fusedrnn._cpu exports an out-of-line PanelGemm function: the CPU micro-kernel is not "
        "inlined (see csrc/cpu/panel_gemm.h, PanelGemm::kernel)")
