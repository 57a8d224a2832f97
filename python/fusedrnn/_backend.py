"""The extension/torch boundary: picks the native module for a device and turns tensors into the
parameter structs of ``csrc/include/fusedrnn/params.h`` (data pointers, sizes, element strides).

Nothing here does math. Callers (``_layer_recurrence.py``) allocate every output with torch and
pass a whole layer of 1 or 2 directions (``forward_layer`` / ``backward_layer``, or
``prepare_forward`` / ``forward_prepared`` for repeated inference); one native call runs the whole
sequence of all of them. Direction 1 runs reversed.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad

# Mirrors fusedrnn::CellKind and fusedrnn::DType (csrc/include/fusedrnn/cell_kind.h).
# "lstm_cifg": the LSTM with coupled input and forget gates (gates f, g, o; i = 1 - f).
CELL_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3, "lstm_cifg": 4}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
GATE_COUNT = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "lstm_cifg": 3}
SAVED_GATE_COUNT = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0, "lstm_cifg": 3}
# The cells with a cell state c beside h (and proj_size, and peephole weights): has_cell_state.
LSTM_CELLS = ("lstm", "lstm_cifg")
# Rows of an LSTM's peephole weights (params.h): w_ci, w_cf, w_co; a CIFG has no input gate.
PEEPHOLE_ROWS = {"lstm": 3, "lstm_cifg": 2}
# The dtypes the CPU kernels (recurrence and cell step) take natively: bfloat16 tensors are
# widened to float inside (csrc/cpu/storage.h); float16 is upcast in Python.
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def reference_cell(cell: str) -> tuple:
    """(cell, coupled_input_forget) as fusedrnn.reference takes them: the kernels' "lstm_cifg" is
    its "lstm" with coupled_input_forget=True."""
    return ("lstm", True) if cell == "lstm_cifg" else (cell, False)


# os.environ keeps its entries in `_data` (POSIX: encoded keys and values), and every write through
# os.environ (or monkeypatch.setenv) updates it, so reading `_data` sees what os.environ.get
# would. It costs 0.02 against 0.7 us for an unset variable (os.environ.get raises and catches a
# KeyError inside), and the inference fast path reads up to five variables a call: ~3 us of a
# ~30 us one-step call (LSTM B=1 H=64 on the 2-core Zen 4 VM).
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env_value(name: str) -> Optional[str]:
    """os.environ.get(name), faster."""
    if not isinstance(_ENVIRON_DATA, dict):
        return os.environ.get(name)
    raw = _ENVIRON_DATA.get(name.encode())
    return None if raw is None else os.fsdecode(raw)


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


# The environment variable that backend_name (and so module_for) reads.
BACKEND_VARIABLE = "FUSEDRNN_BACKEND"


# torch internals the mode checks below read, resolved once, with public fallbacks: the checks
# run at every call of the fast paths, and a private name may move in a later torch (without
# the transform stack, torch.func transforms are not detected and refuse the kernels as before).
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
_transform_stack = (getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
                    or (lambda: None))
_functorch_level = (getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
                    or (lambda: None))
try:  # (imported by torch itself)
    from torch.fx.experimental import proxy_tensor as _proxy_tensor
except ImportError:  # pragma: no cover
    _proxy_tensor = None
_PROXY_MODE = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "PROXY", None)

if hasattr(_proxy_tensor, "_CURRENT_MAKE_FX_TRACER"):
    def make_fx_tracing() -> bool:
        """Whether make_fx (torch.fx.experimental.proxy_tensor) is recording: it sees torch ops
        only, so a direct native call was missing from its graph, which then returned the
        uninitialised output (review, session 32). The tracer make_fx sets for its whole run,
        in every mode, pre_dispatch included (~25 ns; its dispatch mode, ~65 ns, is not on the
        ordinary mode stack under pre_dispatch)."""
        return _proxy_tensor._CURRENT_MAKE_FX_TRACER is not None
else:  # pragma: no cover - a torch without that global: its proxy mode, but for pre_dispatch
    def make_fx_tracing() -> bool:
        return _PROXY_MODE is not None and torch._C._get_dispatch_mode(_PROXY_MODE) is not None


@torch.compiler.assume_constant_result
def _traced_under_functorch() -> bool:
    """While Dynamo traces: whether the trace is inside a torch.func transform (a compiled
    grad/vjp/jacrev/vmap). Run for real at trace time and its result baked into the graph: asked
    in traced code, the functorch level makes Dynamo break the graph inside the transform (and
    with backend="eager" fail in a resumed frame), and the transform stack always shows Dynamo's
    own interpreter."""
    return _functorch_level() is not None


def _dual_level() -> int:
    return getattr(_forward_ad, "_current_level", -1)


def recording_graph() -> bool:
    """Whether torch.compile, torch.jit.trace or make_fx is recording a graph. Then every
    recurrence must run as the custom ops (_custom_ops.layer_forward / layer_backward), which
    the recorder sees as ops: a direct native call is invisible to it, and a trace would replay
    the torch ops around the call without the call itself (garbage outputs, and a trace check
    that passes)."""
    # (torch._C._is_tracing is what torch.jit.is_tracing asks, without its scripting check.)
    return torch.compiler.is_compiling() or _is_tracing() or make_fx_tracing()


def under_transform() -> bool:
    """Whether a torch.func transform (grad, jvp, vmap, jacrev, ...) or forward-mode AD
    (torch.autograd.forward_ad.dual_level) is active. The native recurrence's autograd Functions
    have no forward-mode formula and are not in the form the transforms need (nor are
    torch.library custom ops' in this torch), and under vmap the tensors have no memory of their
    own: there a layer runs as fusedrnn.reference's plain torch ops, which all of them support.
    While torch.compile traces, the same holds for a traced transform (_traced_under_functorch:
    a compiled grad's inputs do not report requires_grad, so the inference op was traced and
    failed in its fake kernel) and for a traced jvp or dual_level block (its tangents through
    the custom ops came out as zeros, with no error)."""
    if _dual_level() >= 0:
        return True
    if torch.compiler.is_compiling():
        return _traced_under_functorch()
    return _transform_stack() is not None


def never_traced(backward):
    """A backward (an eager autograd.Function's, or a custom op's registered one), run eagerly
    even when Dynamo traces it: torch.autograd.grad called inside a compiled function (a MAML
    step, a gradient penalty, an HVP helper) makes Dynamo trace the backwards it runs. Traced,
    the eager layer's create_graph recomputation found no path to xproj (d x and d W_ih came
    back zero), and the op's backward skipped the tag that refuses double backward (the
    penalty's recurrent terms were dropped), both silently. torch.compiler.disable alone costs ~2.3 us at every eager call
    (a cell step's backward is tens of us); asking is_compiling() first costs ~0.1 us."""
    untraced = torch.compiler.disable(backward)

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.compiler.is_compiling():
            return untraced(ctx, *grads)
        return backward(ctx, *grads)
    return run


def plain_eager() -> bool:
    """Neither recording_graph() nor under_transform(), in one call: the only state in which the
    modules' fast paths and the cell step call the native kernels directly (they run at every
    call, and each of these checks costs a Python call)."""
    return not (torch.compiler.is_compiling() or _is_tracing() or make_fx_tracing()
                or _transform_stack() is not None or _dual_level() >= 0)


def without_data(t: torch.Tensor) -> bool:
    """Whether t has no memory a kernel could read: a meta tensor, or a FakeTensor (shape
    propagation under FakeTensorMode). Such a layer runs as the custom ops too, whose fake
    kernels give the results' shapes, as torch.nn's ops do for these tensors."""
    return t.is_meta or (type(t) is not torch.Tensor and _is_fake(t))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # only for Tensor subclasses
    return is_fake(t)


def backend_name() -> str:
    """What CPU tensors run on: 'cpu' (default) or 'emu' (FUSEDRNN_BACKEND=emu)."""
    name = (env_value(BACKEND_VARIABLE) or "cpu").strip().lower() or "cpu"
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


def new_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """The native scratch space, allocated with torch (C++ never allocates device memory). Its
    bytes are whatever the allocator had: the tests fill it with 0xFF (tests/conftest.py), so a
    kernel that reads scratch it did not write shows."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


def _workspace(module, kind: str, params: list, device: torch.device) -> torch.Tensor:
    """A workspace for the native call of these params, set in each."""
    nbytes = int(getattr(module, f"{kind}_workspace_bytes")(params))
    ws = new_workspace(nbytes, device)
    for p in params:
        p.workspace, p.workspace_bytes = ws.data_ptr(), nbytes
    return ws


# --- whole-layer entry points (the functional core's hot path) ------------------------------------
#
# A layer's tensors come with the direction as a leading dimension (or, for [T, B, D*X] sequences,
# as a block of columns of the last one); each direction's pointers are computed by offset
# arithmetic instead of building per-direction views, which at small sizes (B=1, H=64: ~60 us of
# kernel) would cost more than the native call itself.


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


def _check_seq_operands(named, layout: str = "[T, B, X]") -> None:
    """Sequence operands (`layout`: [T, B, X], or [D, T, B, X] per direction) need a dense last
    dimension; the other dimensions may have any strides (params.h's SeqTensor)."""
    dims = layout.count(",") + 1
    for name, t in named:
        if t is not None and (t.dim() != dims or (t.size(-1) > 1 and t.stride(-1) != 1)):
            raise RuntimeError(
                f"fusedrnn internal error: {name} must be {layout} with a contiguous last "
                f"dimension, got shape {tuple(t.shape)} strides {t.stride()}")


# Both layer calls build the params structs with the all-fields constructors of
# csrc/bindings/params_binding.h (one pybind11 call per direction instead of one per field);
# the argument order there is the field order of RecurrenceFwdParams / RecurrenceBwdParams.


class _LayerCall(NamedTuple):
    """The params fields that forward_layer and backward_layer fill alike."""
    codes: tuple        # (cell code, dtype code)
    hidden: int         # H, from w_hh [G*H, P]
    state: int          # P
    gates_width: int    # G*H: one direction's columns of xproj / d_xproj / d_hproj
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
    gates_width, state = w_hh[0].shape
    call = _LayerCall((CELL_CODES[cell], DTYPE_CODES[w_hh[0].dtype]),
                      gates_width // GATE_COUNT[cell], state, gates_width,
                      lengths.data_ptr() if lengths is not None else 0, weights,
                      (torch.get_num_threads(), stream))
    return module_for(device), call


def _set_peephole(params, peephole) -> None:
    """Hands each direction's peephole weights ([3, H], a CIFG's [2, H]) to its params (left
    null without)."""
    if peephole:
        _check_layer_operands([("peephole", w) for w in peephole])
        for p, w in zip(params, peephole):
            p.peephole = w.data_ptr()


def forward_layer(cell: str, xproj: torch.Tensor, w_hh, b_hh, w_hr, h0, c0, out: torch.Tensor,
                  hn: torch.Tensor, cn, gates, c_seq, r_seq, lengths, peephole=()) -> None:
    """One native forward call for all D directions of a layer.

    xproj [T, B, D*G*H] (last dim contiguous); w_hh, b_hh, w_hr: sequences of D tensors (or Nones),
    contiguous; h0 [D, B, P], c0 [D, B, H] contiguous or None; out [T, B, D*P] (last dim
    contiguous); hn [D, B, P], cn [D, B, H] contiguous; gates [D, T, B, S*H] (last dim
    contiguous: it may be a view of xproj, params.h), c_seq and r_seq [D, T, B, H] contiguous or
    None (inference); peephole: D contiguous [3, H] LSTM peephole weights ([2, H] for
    lstm_cifg), or empty for none.
    Direction 1 runs reversed.
    """
    seq_len, batch = xproj.shape[0], xproj.shape[1]
    _check_seq_operands((("xproj", xproj), ("out", out)))
    _check_seq_operands((("gates", gates),), "[D, T, B, X]")
    _check_layer_operands((("h0", h0), ("c0", c0), ("hn", hn), ("cn", cn),
                           ("c_seq", c_seq), ("r_seq", r_seq), ("lengths", lengths)))
    module, call = _layer_call(cell, xproj.device, w_hh, b_hh, w_hr, lengths)
    gates_width, state = call.gates_width, call.state
    params = []
    for d in range(len(w_hh)):
        fields = (*call.codes, seq_len, batch, call.hidden, state, d == 1, call.lengths,
                  _half_seq(xproj, d, gates_width), *call.weights[d],
                  _dir_ptr(h0, d), _dir_ptr(c0, d), _half_seq(out, d, state),
                  _dir_ptr(hn, d), _dir_ptr(cn, d),
                  _dir_seq(gates, d), _dir_seq(c_seq, d), _dir_seq(r_seq, d), *call.execution)
        params.append(module.FwdParams(*fields))
    _set_peephole(params, peephole)
    ws = _workspace(module, "forward", params, xproj.device)
    module.forward(params)
    del ws  # torch's allocator orders the free after the kernel on the stream


def backward_layer(cell: str, w_hh, b_hh, w_hr, h0, c0, out: torch.Tensor, gates, c_seq, d_out,
                   d_hn, d_cn, d_xproj: torch.Tensor, d_hproj, d_h_seq, d_h0: torch.Tensor, d_c0,
                   lengths, peephole=()) -> None:
    """One native backward call for all D directions of a layer; layouts as in forward_layer,
    plus d_out [T, B, D*P] (last dim contiguous) or None, d_hn [D, B, P], d_cn [D, B, H] or None,
    d_xproj and d_hproj [T, B, D*G*H], d_h_seq [D, T, B, P], d_h0 [D, B, P], d_c0 [D, B, H]."""
    seq_len, batch = out.shape[0], out.shape[1]
    _check_seq_operands((("out", out), ("d_out", d_out), ("d_xproj", d_xproj),
                         ("d_hproj", d_hproj)))
    _check_seq_operands((("gates", gates),), "[D, T, B, X]")
    _check_layer_operands((("h0", h0), ("c0", c0), ("c_seq", c_seq),
                           ("d_hn", d_hn), ("d_cn", d_cn), ("d_h_seq", d_h_seq), ("d_h0", d_h0),
                           ("d_c0", d_c0), ("lengths", lengths)))
    module, call = _layer_call(cell, out.device, w_hh, b_hh, w_hr, lengths)
    gates_width, state = call.gates_width, call.state
    params = []
    for d in range(len(w_hh)):
        fields = (*call.codes, seq_len, batch, call.hidden, state, d == 1, call.lengths,
                  *call.weights[d],
                  _dir_ptr(h0, d), _dir_ptr(c0, d), _half_seq(out, d, state),
                  _dir_seq(gates, d), _dir_seq(c_seq, d), _half_seq(d_out, d, state),
                  _dir_ptr(d_hn, d), _dir_ptr(d_cn, d), _half_seq(d_xproj, d, gates_width),
                  _half_seq(d_hproj, d, gates_width), _dir_seq(d_h_seq, d),
                  _dir_ptr(d_h0, d), _dir_ptr(d_c0, d), *call.execution)
        params.append(module.BwdParams(*fields))
    _set_peephole(params, peephole)
    ws = _workspace(module, "backward", params, out.device)
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
    storage: tuple           # detached views of the tensors the templates point into: whatever
                             # happens to the tensors (`.data =`), this memory stays alive
    workspace_bytes: dict    # (seq_len, batch, threads, environment knobs) -> bytes, as calls come


def prepare_forward(cell: str, w_hh, b_hh, w_hr, peephole=()) -> PreparedForward:
    """Templates for the D directions of a layer; w_hh, b_hh, w_hr: sequences of D contiguous
    tensors (or Nones), peephole D contiguous [3, H] LSTM peephole weights ([2, H] for
    lstm_cifg) or empty, all of one dtype on one device. The templates point into their memory:
    later in-place changes of the values are seen, a change of memory (`.data =`) is not."""
    device = w_hh[0].device
    module, call = _layer_call(cell, device, w_hh, b_hh, w_hr, None)
    null_seq = (0, 0, 0)
    templates = [module.FwdParams(*call.codes, 1, 1, call.hidden, call.state, d == 1, 0, null_seq,
                                  *call.weights[d], 0, 0, null_seq, 0, 0, null_seq, null_seq,
                                  null_seq, 1, 0)
                 for d in range(len(w_hh))]
    _set_peephole(templates, peephole)
    storage = tuple(t.detach() for t in (*w_hh, *b_hh, *w_hr, *peephole) if t is not None)
    return PreparedForward(module, device, templates, storage, {})


def forward_prepared(prep: PreparedForward, xproj: list, out: torch.Tensor, h0, c0,
                     hn: torch.Tensor, cn, b_hh=None) -> None:
    """Inference forward of a prepared layer: xproj, one [T, B, G*H] input projection (x W_ih^T
    + b_ih) per direction; out [T, B, D*P], both with a dense last dimension; h0/hn [D, B, P] and
    c0/cn [D, B, H] contiguous (h0, c0 may be None). b_hh: None, or per direction a contiguous
    [G*H] bias the kernel adds in place of the prepared b_hh for this call (for LSTM and Elman
    layers b_ih + b_hh, with xproj = x W_ih^T; never for a GRU)."""
    seq_len, batch = out.shape[0], out.shape[1]
    if out.stride(2) != 1 or any(x.stride(2) != 1 for x in xproj):
        raise RuntimeError("fusedrnn internal error: xproj and out need a dense last dimension")
    module = prep.module
    # The CPU workspace layout depends on the SIMD width, which FUSEDRNN_CPU_ISA can lower, and
    # on how the threads split the work (threads that split the batch rows each have a
    # workspace): the thread count, and the tests' knobs that force a split.
    threads = torch.get_num_threads()
    key = (seq_len, batch, threads, env_value("FUSEDRNN_CPU_ISA"),
           env_value("FUSEDRNN_CPU_TEST_THREADS"), env_value("FUSEDRNN_CPU_TEST_SPLIT"))
    nbytes = prep.workspace_bytes.get(key)
    if nbytes is None:
        nbytes = int(module.forward_prepared_workspace_bytes(prep.templates, seq_len, batch,
                                                             threads))
        if len(prep.workspace_bytes) >= 64:  # many shapes (serving): keep the cache bounded
            prep.workspace_bytes.clear()
        prep.workspace_bytes[key] = nbytes
    device = prep.device
    ws = new_workspace(nbytes, device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    module.forward_prepared(
        prep.templates, seq_len, batch, [(x.data_ptr(), x.stride(0), x.stride(1)) for x in xproj],
        (out.data_ptr(), out.stride(0), out.stride(1)),
        h0.data_ptr() if h0 is not None else 0, c0.data_ptr() if c0 is not None else 0,
        hn.data_ptr(), cn.data_ptr() if cn is not None else 0, ws.data_ptr(), nbytes,
        threads, stream, *(() if b_hh is None else ([b.data_ptr() for b in b_hh],)))
    del ws  # torch's allocator orders the free after the kernel on the stream
