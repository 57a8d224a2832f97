"""The extension/torch boundary: picks the native module for a device and turns tensors into the
parameter structs of ``csrc/include/fusedrnn/params.h`` (data pointers, sizes, element strides).

Nothing here does math. Callers (``functional.py``) allocate every output with torch and describe
one layer as a list of 1 or 2 directions; one native call runs the whole sequence of all of them.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

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


# --- whole-layer entry points (the functional core's hot path) ------------------------------------
#
# run_forward/run_backward above take one dataclass of views per direction; building those views
# and dataclasses costs more than the native call itself at small sizes (B=1, H=64: ~60 us of
# kernel). The functions below take a layer's tensors with the direction as a leading dimension
# (or, for [T, B, D*X] sequences, as a slice of the last one) and compute each direction's
# pointers by offset arithmetic. Same structs, same native calls, same semantics.



def _dir_ptr(t: Optional[torch.Tensor], d: int) -> int:
    """Data pointer of t[d] for a contiguous [D, ...] tensor (0 for None)."""
    if t is None:
        return 0
    return t.data_ptr() + d * t.stride(0) * t.element_size()


def _dir_seq(t: Optional[torch.Tensor], d: int):
    """SeqTensor tuple of t[d] for a [D, T, B, X] tensor with a contiguous last dimension."""
    if t is None:
        return (0, 0, 0)
    return (t.data_ptr() + d * t.stride(0) * t.element_size(), t.stride(1), t.stride(2))


def _half_seq(t: Optional[torch.Tensor], d: int, width: int):
    """SeqTensor tuple of t[:, :, d*width:(d+1)*width] for a [T, B, D*width] tensor."""
    if t is None:
        return (0, 0, 0)
    return (t.data_ptr() + d * width * t.element_size(), t.stride(0), t.stride(1))


def _check_layer_operands(named) -> None:
    for name, t in named:
        if t is not None and not t.is_contiguous():
            raise RuntimeError(f"fusedrnn internal error: {name} must be contiguous")


def _check_seq_operands(named) -> None:
    for name, t in named:
        if t is not None and (t.dim() != 3 or (t.size(2) > 1 and t.stride(2) != 1)):
            raise RuntimeError(
                f"fusedrnn internal error: {name} must be [T, B, X] with a contiguous last "
                f"dimension, got shape {tuple(t.shape)} strides {t.stride()}")


# Both layer calls build the params structs with the all-fields constructors of
# csrc/bindings/params_binding.h (one pybind11 call per direction instead of one per field);
# the argument order there is the field order of RecurrenceFwdParams / RecurrenceBwdParams.


class _LayerCall(NamedTuple):
    """The params fields that forward_layer and backward_layer fill alike."""
    codes: tuple        # (cell code, dtype code)
    lengths: int        # data pointer of lengths, or 0
    weights: list       # per direction: (w_hh, b_hh, w_hr) data pointers, 0 for None
    execution: tuple    # (num_threads, cuda_stream)


def _layer_call(cell: str, device: torch.device, w_hh, b_hh, w_hr, lengths):
    """Checks the layer's weights and returns the native module and the shared fields."""
    _check_layer_operands([("w_hh", w) for w in w_hh] + [("b_hh", b) for b in b_hh]
                          + [("w_hr", w) for w in w_hr])
    weights = [tuple(t.data_ptr() if t is not None else 0 for t in ws)
               for ws in zip(w_hh, b_hh, w_hr)]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    call = _LayerCall((CELL_CODES[cell], DTYPE_CODES[w_hh[0].dtype]),
                      lengths.data_ptr() if lengths is not None else 0, weights,
                      (torch.get_num_threads(), stream))
    return module_for(device), call


def forward_layer(cell: str, xproj: torch.Tensor, w_hh, b_hh, w_hr, h0, c0, out: torch.Tensor,
                  hn: torch.Tensor, cn, gates, c_seq, r_seq, lengths) -> None:
    """One native forward call for all D directions of a layer.

    xproj [T, B, D*G*H] (last dim contiguous); w_hh, b_hh, w_hr: sequences of D tensors (or Nones),
    contiguous; h0 [D, B, P], c0 [D, B, H] contiguous or None; out [T, B, D*P] (last dim
    contiguous); hn [D, B, P], cn [D, B, H] contiguous; gates [D, T, B, S*H], c_seq and r_seq
    [D, T, B, H] contiguous or None (inference). Direction 1 runs reversed.
    """
    num_dirs = len(w_hh)
    device = xproj.device
    seq_len, batch = xproj.shape[0], xproj.shape[1]
    gates_width = xproj.shape[2] // num_dirs
    hidden = gates_width // GATE_COUNT[cell]
    state = w_hh[0].shape[1]
    _check_seq_operands((("xproj", xproj), ("out", out)))
    _check_layer_operands((("h0", h0), ("c0", c0), ("hn", hn), ("cn", cn), ("gates", gates),
                           ("c_seq", c_seq), ("r_seq", r_seq), ("lengths", lengths)))
    module, call = _layer_call(cell, device, w_hh, b_hh, w_hr, lengths)
    params = []
    for d in range(num_dirs):
        fields = (*call.codes, seq_len, batch, hidden, state, d == 1, call.lengths,
                  _half_seq(xproj, d, gates_width), *call.weights[d],
                  _dir_ptr(h0, d), _dir_ptr(c0, d), _half_seq(out, d, state),
                  _dir_ptr(hn, d), _dir_ptr(cn, d),
                  _dir_seq(gates, d), _dir_seq(c_seq, d), _dir_seq(r_seq, d), *call.execution)
        params.append(module.FwdParams(*fields))
    ws = _workspace(module, "forward", params, device)
    module.forward(params)
    del ws  # torch's allocator orders the free after the kernel on the stream


def backward_layer(cell: str, w_hh, b_hh, w_hr, h0, c0, out: torch.Tensor, gates, c_seq, d_out,
                   d_hn, d_cn, d_xproj: torch.Tensor, d_hproj, d_h_seq, d_h0: torch.Tensor, d_c0,
                   lengths) -> None:
    """One native backward call for all D directions of a layer; layouts as in forward_layer,
    plus d_out [T, B, D*P] (last dim contiguous) or None, d_hn [D, B, P], d_cn [D, B, H] or None,
    d_xproj and d_hproj [T, B, D*G*H], d_h_seq [D, T, B, P], d_h0 [D, B, P], d_c0 [D, B, H]."""
    num_dirs = len(w_hh)
    device = out.device
    seq_len, batch = out.shape[0], out.shape[1]
    gates_width = d_xproj.shape[2] // num_dirs
    hidden = gates_width // GATE_COUNT[cell]
    state = w_hh[0].shape[1]
    _check_seq_operands((("out", out), ("d_out", d_out), ("d_xproj", d_xproj),
                         ("d_hproj", d_hproj)))
    _check_layer_operands((("h0", h0), ("c0", c0), ("gates", gates), ("c_seq", c_seq),
                           ("d_hn", d_hn), ("d_cn", d_cn), ("d_h_seq", d_h_seq), ("d_h0", d_h0),
                           ("d_c0", d_c0), ("lengths", lengths)))
    module, call = _layer_call(cell, device, w_hh, b_hh, w_hr, lengths)
    params = []
    for d in range(num_dirs):
        fields = (*call.codes, seq_len, batch, hidden, state, d == 1, call.lengths,
                  *call.weights[d],
                  _dir_ptr(h0, d), _dir_ptr(c0, d), _half_seq(out, d, state),
                  _dir_seq(gates, d), _dir_seq(c_seq, d), _half_seq(d_out, d, state),
                  _dir_ptr(d_hn, d), _dir_ptr(d_cn, d), _half_seq(d_xproj, d, gates_width),
                  _half_seq(d_hproj, d, gates_width), _dir_seq(d_h_seq, d),
                  _dir_ptr(d_h0, d), _dir_ptr(d_c0, d), *call.execution)
        params.append(module.BwdParams(*fields))
    ws = _workspace(module, "backward", params, device)
    module.backward(params)
    del ws


# --- prepared forward (the modules' repeated inference call) --------------------------------------
#
# Everything of a layer's forward that does not change from call to call (cell, dtype, sizes,
# direction, weight pointers) is built once into per-direction FwdParams "templates"; a call then
# passes only its sequences and states (csrc/bindings/prepared_forward_binding.h).


class PreparedForward(NamedTuple):
    """A layer's forward, ready for repeated inference calls (see prepare_forward)."""
    module: object           # the native module that runs it
    device: torch.device
    templates: list          # FwdParams per direction: weights and sizes; per-call fields unset
    weights: tuple           # the tensors the templates point into: alive while this is
    workspace_bytes: dict    # (seq_len, batch) -> bytes, filled as calls come


def prepare_forward(cell: str, w_hh, b_hh, w_hr) -> PreparedForward:
    """Templates for the D directions of a layer; w_hh, b_hh, w_hr: sequences of D contiguous
    tensors (or Nones), all of one dtype on one device. The caller keeps them unchanged."""
    device = w_hh[0].device
    module, call = _layer_call(cell, device, w_hh, b_hh, w_hr, None)
    hidden = w_hh[0].shape[0] // GATE_COUNT[cell]
    state = w_hh[0].shape[1]
    null_seq = (0, 0, 0)
    templates = [module.FwdParams(*call.codes, 1, 1, hidden, state, d == 1, 0, null_seq,
                                  *call.weights[d], 0, 0, null_seq, 0, 0, null_seq, null_seq,
                                  null_seq, 1, 0)
                 for d in range(len(w_hh))]
    return PreparedForward(module, device, templates, (*w_hh, *b_hh, *w_hr), {})


def forward_prepared(prep: PreparedForward, xproj: torch.Tensor, out: torch.Tensor, h0, c0,
                     hn: torch.Tensor, cn) -> None:
    """Inference forward of a prepared layer; the layouts of forward_layer: xproj [T, B, D*G*H]
    and out [T, B, D*P] with a dense last dimension, h0/hn [D, B, P] and c0/cn [D, B, H]
    contiguous (h0, c0 may be None)."""
    seq_len, batch = xproj.shape[0], xproj.shape[1]
    if xproj.stride(2) != 1 or out.stride(2) != 1:
        raise RuntimeError("fusedrnn internal error: xproj and out need a dense last dimension")
    module = prep.module
    key = (seq_len, batch)
    nbytes = prep.workspace_bytes.get(key)
    if nbytes is None:
        nbytes = int(module.forward_prepared_workspace_bytes(prep.templates, seq_len, batch))
        if len(prep.workspace_bytes) >= 64:  # many shapes (serving): keep the cache bounded
            prep.workspace_bytes.clear()
        prep.workspace_bytes[key] = nbytes
    device = prep.device
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    module.forward_prepared(
        prep.templates, seq_len, batch, (xproj.data_ptr(), xproj.stride(0), xproj.stride(1)),
        (out.data_ptr(), out.stride(0), out.stride(1)),
        h0.data_ptr() if h0 is not None else 0, c0.data_ptr() if c0 is not None else 0,
        hn.data_ptr(), cn.data_ptr() if cn is not None else 0, ws.data_ptr(), nbytes,
        torch.get_num_threads(), stream)
    del ws  # torch's allocator orders the free after the kernel on the stream
