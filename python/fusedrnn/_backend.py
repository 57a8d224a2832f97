"""The extension/torch boundary: picks the native module for a device and turns tensors into the
parameter structs of ``csrc/include/fusedrnn/params.h`` (data pointers, sizes, element strides).

Nothing here does math. Callers (``functional.py``) allocate every output with torch and describe
one layer as a list of 1 or 2 directions; one native call runs the whole sequence of all of them.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

# Mirrors fusedrnn::CellKind and fusedrnn::DType (csrc/include/fusedrnn/cell_kind.h).
CELL_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
GATE_COUNT = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
SAVED_GATE_COUNT = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}


def _try_import(name: str):
    try:
        return importlib.import_module(f"fusedrnn.{name}")
    except ImportError:
        return None


_cpu = _try_import("_cpu")
_cuda = _try_import("_cuda")
_emu = _try_import("_emu")

HAS_CPU = _cpu is not None
HAS_CUDA = _cuda is not None and torch.cuda.is_available()
HAS_EMU = _emu is not None


def backend_name() -> str:
    """What CPU tensors run on: 'cpu' (default) or 'emu' (FUSEDRNN_BACKEND=emu)."""
    name = os.environ.get("FUSEDRNN_BACKEND", "cpu").strip().lower() or "cpu"
    if name not in ("cpu", "emu"):
        raise RuntimeError(f"FUSEDRNN_BACKEND must be 'cpu' or 'emu', got {name!r}")
    return name


def module_for(device: torch.device):
    """The native module that runs the recurrence for tensors on `device`."""
    if device.type == "cuda":
        if _cuda is None:
            raise RuntimeError(
                "fusedrnn was built without CUDA support (no fusedrnn._cuda module); rebuild with "
                "FUSEDRNN_CUDA=ON to run on CUDA tensors")
        return _cuda
    if device.type == "cpu":
        if backend_name() == "emu":
            if _emu is None:
                raise RuntimeError(
                    "FUSEDRNN_BACKEND=emu but fusedrnn._emu was not built (build with FUSEDRNN_EMU=ON)")
            return _emu
        if _cpu is None:
            raise RuntimeError("fusedrnn._cpu is missing: the package was not built correctly")
        return _cpu
    raise RuntimeError(f"fusedrnn supports cpu and cuda tensors, got a tensor on {device}")


@dataclass
class DirectionForward:
    """One direction of one layer, forward. Shapes: T, B, H, P (state), G gates, S saved gates."""
    xproj: torch.Tensor                    # [T, B, G*H] x W_ih^T + b_ih (no b_hh), last dim contiguous
    w_hh: torch.Tensor                     # [G*H, P]
    b_hh: Optional[torch.Tensor]           # [G*H]
    w_hr: Optional[torch.Tensor]           # [P, H] projected LSTM
    h0: Optional[torch.Tensor]             # [B, P]
    c0: Optional[torch.Tensor]             # [B, H] LSTM
    out: torch.Tensor                      # [T, B, P] written (may be a strided view)
    hn: torch.Tensor                       # [B, P] written
    cn: Optional[torch.Tensor]             # [B, H] written, LSTM
    reverse: bool
    gates: Optional[torch.Tensor] = None   # [T, B, S*H] written when training (LSTM, GRU)
    c_seq: Optional[torch.Tensor] = None   # [T, B, H] written when training (LSTM)
    r_seq: Optional[torch.Tensor] = None   # [T, B, H] written when training (projected LSTM)


@dataclass
class DirectionBackward:
    """One direction of one layer, backward; the forward's tensors plus gradients."""
    w_hh: torch.Tensor
    b_hh: Optional[torch.Tensor]
    w_hr: Optional[torch.Tensor]
    h0: Optional[torch.Tensor]
    c0: Optional[torch.Tensor]
    out: torch.Tensor                      # [T, B, P] forward output
    gates: Optional[torch.Tensor]          # [T, B, S*H]
    c_seq: Optional[torch.Tensor]          # [T, B, H] LSTM
    d_out: Optional[torch.Tensor]          # [T, B, P]
    d_hn: Optional[torch.Tensor]           # [B, P]
    d_cn: Optional[torch.Tensor]           # [B, H]
    d_xproj: torch.Tensor                  # [T, B, G*H] written
    d_hproj: Optional[torch.Tensor]        # [T, B, G*H] written (GRU; None means == d_xproj)
    d_h_seq: Optional[torch.Tensor]        # [T, B, P] written (projected LSTM)
    d_h0: torch.Tensor                     # [B, P] written
    d_c0: Optional[torch.Tensor]           # [B, H] written, LSTM
    reverse: bool


def _ptr(t: Optional[torch.Tensor], name: str) -> int:
    if t is None:
        return 0
    if not t.is_contiguous():
        raise RuntimeError(f"fusedrnn internal error: {name} must be contiguous")
    return t.data_ptr()


def _seq(t: Optional[torch.Tensor], name: str):
    if t is None:
        return (0, 0, 0)
    if t.dim() != 3 or (t.size(2) > 1 and t.stride(2) != 1):
        raise RuntimeError(
            f"fusedrnn internal error: {name} must be [T, B, X] with a contiguous last dimension, "
            f"got shape {tuple(t.shape)} strides {t.stride()}")
    return (t.data_ptr(), t.stride(0), t.stride(1))


def _fill_shape(p, cell: str, d, lengths: Optional[torch.Tensor], seq_len: int, batch: int,
                hidden: int, state: int) -> None:
    p.cell = CELL_CODES[cell]
    p.dtype = DTYPE_CODES[d.w_hh.dtype]
    p.seq_len, p.batch, p.hidden, p.state = seq_len, batch, hidden, state
    p.reverse = bool(d.reverse)
    p.lengths = _ptr(lengths, "lengths")


def _execution(p, device: torch.device) -> None:
    p.num_threads = torch.get_num_threads()
    p.cuda_stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _workspace(module, kind: str, params: list, device: torch.device) -> torch.Tensor:
    """Allocates the native scratch space with torch (C++ never allocates device memory)."""
    nbytes = int(getattr(module, f"{kind}_workspace_bytes")(params))
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    for p in params:
        p.workspace, p.workspace_bytes = ws.data_ptr(), nbytes
    return ws


def run_forward(cell: str, dirs: list[DirectionForward], lengths: Optional[torch.Tensor]) -> None:
    """Runs the recurrence of one layer (all its directions) in one native call."""
    first = dirs[0]
    module = module_for(first.w_hh.device)
    seq_len, batch = first.xproj.shape[0], first.xproj.shape[1]
    hidden = first.xproj.shape[2] // GATE_COUNT[cell]
    state = first.w_hh.shape[1]
    params = []
    for d in dirs:
        p = module.FwdParams()
        _fill_shape(p, cell, d, lengths, seq_len, batch, hidden, state)
        p.xproj = _seq(d.xproj, "xproj")
        p.w_hh, p.b_hh, p.w_hr = _ptr(d.w_hh, "w_hh"), _ptr(d.b_hh, "b_hh"), _ptr(d.w_hr, "w_hr")
        p.h0, p.c0 = _ptr(d.h0, "h0"), _ptr(d.c0, "c0")
        p.out = _seq(d.out, "out")
        p.hn, p.cn = _ptr(d.hn, "hn"), _ptr(d.cn, "cn")
        p.gates, p.c_seq, p.r_seq = _seq(d.gates, "gates"), _seq(d.c_seq, "c_seq"), _seq(d.r_seq, "r_seq")
        _execution(p, first.w_hh.device)
        params.append(p)
    ws = _workspace(module, "forward", params, first.w_hh.device)
    module.forward(params)
    del ws  # torch's allocator orders the free after the kernel on the stream


def run_backward(cell: str, dirs: list[DirectionBackward], lengths: Optional[torch.Tensor]) -> None:
    first = dirs[0]
    module = module_for(first.w_hh.device)
    seq_len, batch = first.out.shape[0], first.out.shape[1]
    hidden = first.d_xproj.shape[2] // GATE_COUNT[cell]
    state = first.w_hh.shape[1]
    params = []
    for d in dirs:
        p = module.BwdParams()
        _fill_shape(p, cell, d, lengths, seq_len, batch, hidden, state)
        p.w_hh, p.b_hh, p.w_hr = _ptr(d.w_hh, "w_hh"), _ptr(d.b_hh, "b_hh"), _ptr(d.w_hr, "w_hr")
        p.h0, p.c0 = _ptr(d.h0, "h0"), _ptr(d.c0, "c0")
        p.out, p.gates, p.c_seq = _seq(d.out, "out"), _seq(d.gates, "gates"), _seq(d.c_seq, "c_seq")
        p.d_out = _seq(d.d_out, "d_out")
        p.d_hn, p.d_cn = _ptr(d.d_hn, "d_hn"), _ptr(d.d_cn, "d_cn")
        p.d_xproj, p.d_hproj = _seq(d.d_xproj, "d_xproj"), _seq(d.d_hproj, "d_hproj")
        p.d_h_seq = _seq(d.d_h_seq, "d_h_seq")
        p.d_h0, p.d_c0 = _ptr(d.d_h0, "d_h0"), _ptr(d.d_c0, "d_c0")
        _execution(p, first.w_hh.device)
        params.append(p)
    ws = _workspace(module, "backward", params, first.w_hh.device)
    module.backward(params)
    del ws
