"""The functional core: stacked LSTM/GRU/RNN layers through the native recurrence, with autograd.

Per layer (DESIGN.md, "The one idea behind the speed"):
  1. the input projection of all directions is ONE torch GEMM (the directions' W_ih concatenated),
     left to torch autograd, so dx and dW_ih are torch GEMMs too; for LSTM and RNN b_ih joins
     b_hh (the kernel adds b_ih + b_hh), so the GEMM has no bias and one sum gives both bias grads;
  2. `_LayerRecurrence` runs the recurrence of all directions in one native call, each direction
     writing straight into its half of the [T, B, D*P] output (strided views, no concat);
  3. its backward runs the native backward recurrence, which returns the gate pre-activation
     gradients, and turns them into dW_hh, db_hh (and dW_hr) with torch GEMMs.
Dropout between layers is torch's F.dropout on each non-last layer's output, as in torch.nn.

Under torch.compile, steps 2 and 3 are the custom ops `fusedrnn::layer_forward` and
`fusedrnn::layer_backward` (torch.library, with fake kernels and a registered backward formula),
so a whole network compiles with fullgraph=True; eagerly the autograd.Function skips the ops'
dispatch cost. Both run the same functions (_run_forward, _run_backward, _layer_grads).

`rnn(...)` has the signature of `reference.rnn(...)` and the same semantics; the modules call it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import (_backend, _cell_step, _compiled_inference, _input_projection, _onnx_export,
               _recomputed_grads, _validation, reference)
from ._backend import GATE_COUNT, LSTM_CELLS, SAVED_GATE_COUNT

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cifg")
# Precision the CPU kernels do not take: computed in float32, returned in the input's dtype. (They
# take bfloat16 tensors, widened to float inside, csrc/cpu/storage.h. The CUDA kernels implement
# both half types, also when emulated on CPU tensors with FUSEDRNN_BACKEND=emu.)
_UPCAST_ON_CPU = (torch.float16,)


def rnn(cell: str, input: Tensor, weights, hx=None, *, num_layers: int = 1,
        bidirectional: bool = False, batch_first: bool = False, lengths: Optional[Tensor] = None,
        dropout: float = 0.0, training: bool = False, dropout_fn=None):
    """A stacked, optionally bidirectional RNN over a padded sequence, on the native kernels.

    Same arguments and results as `fusedrnn.reference.rnn` (see there): input [T, B, I]
    ([B, T, I] with batch_first); weights: per layer and direction (w_ih, w_hh, b_ih, b_hh, w_hr)
    in torch's all_weights order, and for a peephole LSTM its [3, H] peephole weights as a sixth
    entry; cell "lstm_cifg" is reference.rnn's "lstm" with coupled_input_forget=True (weights of
    the gates f, g, o; [2, H] peephole weights w_cf, w_co); hx: h_0 [L*D, B, P] or for an LSTM
    (h_0, c_0 [L*D, B, H]), None for zeros; lengths [B] int64 (each in [1, T]) on input's device.
    Returns (output, h_n [L*D, B, P], c_n [L*D, B, H] or None).
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    num_directions = 2 if bidirectional else 1
    if len(weights) != num_layers * num_directions:
        raise ValueError(f"expected {num_layers * num_directions} layer weights "
                         f"(num_layers * num_directions), got {len(weights)}")
    for entry in weights:
        if len(entry) not in (5, 6):
            raise ValueError("each layer weights entry must be (w_ih, w_hh, b_ih, b_hh, w_hr) "
                             f"or, for a peephole LSTM, those and the peephole weights; got "
                             f"{len(entry)} entries")
    _validation.check_rnn_state_structure(cell, hx)
    _validation.check_input_weights(input, weights, num_directions)
    # A traced graph must not depend on grad mode (torch.jit.trace checks a trace by tracing
    # again under no_grad): there every layer saves for backward when the caller's tensors require
    # grad, decided here, before a cast (float16, autocast) makes copies whose requires_grad
    # follows grad mode.
    trace_save = torch.jit.is_tracing() and _any_requires_grad(input, weights, hx)
    # A compiled call that needs no gradient runs the eager fast path as one op (asked only
    # while compiling: eagerly this runs at every call).
    if torch.compiler.is_compiling():
        needs_grad = torch.is_grad_enabled() and _any_requires_grad(input, weights, hx)
        if _compiled_inference.applies(cell, input, weights, hx, num_layers, num_directions,
                                       lengths, dropout, training, needs_grad):
            return _compiled_inference.run(cell, input, weights, hx, num_layers, num_directions,
                                           batch_first)
    # Autocast would turn the input projection into another dtype than the recurrent weights, and
    # the native call takes one dtype for all its tensors: dtypes are chosen explicitly here.
    # (Autocast has no meta device: a meta input runs as it is.)
    if input.is_meta or not torch.is_autocast_enabled(input.device.type):  # entering costs ~3 us
        return _rnn(cell, input, weights, hx, num_layers, num_directions, batch_first, lengths,
                    dropout, training, dropout_fn, trace_save)
    input, weights, hx = _autocast_operands(input, weights, hx)
    with torch.autocast(input.device.type, enabled=False):
        return _rnn(cell, input, weights, hx, num_layers, num_directions, batch_first, lengths,
                    dropout, training, dropout_fn, trace_save)


def _any_requires_grad(input: Tensor, weights, hx) -> bool:
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    return any(isinstance(t, Tensor) and t.requires_grad
               for t in (input, *states, *(w for layer in weights for w in layer)))


def _autocast_operands(input, weights, hx):
    """Under autocast the whole recurrence runs in the autocast dtype, as torch.nn's CUDA RNNs do
    (cuDNN's autocast kernel casts input, weights and states; the cells are on autocast's
    lower-precision list). The casts are differentiable, so gradients reach the float32
    parameters. Like autocast, only float32/float16/bfloat16 tensors are cast, never float64.
    On the CPU torch.nn differs per cell (LSTM and RNN return bfloat16, GRU float32); fusedrnn
    follows the one rule on both devices."""
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    if any(isinstance(t, Tensor) and t.dtype == torch.float64
           for t in (input, *[w for layer in weights for w in layer])):
        return input, weights, hx  # float64 stays float64 (autocast leaves it alone)
    weights = [tuple(cast(w) for w in layer) for layer in weights]
    if isinstance(hx, (tuple, list)):
        hx = type(hx)(cast(s) for s in hx)
    else:
        hx = cast(hx)
    return cast(input), weights, hx


def _rnn(cell, input, weights, hx, num_layers, num_directions, batch_first, lengths, dropout,
         training, dropout_fn, trace_save: bool):
    h0_all, c0_all = (hx if cell in LSTM_CELLS else (hx, None)) if hx is not None else (None, None)
    if lengths is not None:
        lengths = _checked_lengths(lengths, input, batch_first)

    out_dtype = input.dtype
    compute_dtype = _compute_dtype(input)
    if compute_dtype != out_dtype:
        input = input.to(compute_dtype)
        weights = [tuple(_cast(w, compute_dtype) for w in ws) for ws in weights]
        h0_all, c0_all = _cast(h0_all, compute_dtype), _cast(c0_all, compute_dtype)

    x = input.transpose(0, 1) if batch_first else input  # time-major view, like torch's kernels
    batch = x.shape[1]
    if dropout_fn is None:
        def dropout_fn(output):
            return F.dropout(output, dropout, training=True)
    apply_dropout = training and dropout > 0

    h_n, c_n = [], []
    for layer in range(num_layers):
        first, last = layer * num_directions, (layer + 1) * num_directions
        layer_weights = weights[first:last]
        h0, c0 = h0_all, c0_all
        if num_layers > 1:  # one layer: no slice (in training, no SliceBackward zero-fill)
            h0 = h0_all[first:last] if h0_all is not None else None
            c0 = c0_all[first:last] if c0_all is not None else None
        h0, c0 = _contiguous(h0), _contiguous(c0)
        if batch == 0 or layer_weights[0][1].size(0) == 0:
            x, hn, cn = _empty_layer(cell, x, layer_weights, num_directions, h0, c0)
        else:
            x, hn, cn = _layer(cell, x, layer_weights, h0, c0, lengths, trace_save)
        h_n.append(hn)
        c_n.append(cn)
        if apply_dropout and layer < num_layers - 1:
            x = dropout_fn(x)

    if not _backend.recording_graph() and isinstance(x.grad_fn, _LayerRecurrence._backward_cls):
        # The last layer's node saved this very tensor (its backward reads h_{t-1} from it).
        # torch.nn's CPU RNNs return one of their own, so callers change it in place before
        # backward (`out += residual`, ReLU(inplace=True), masked_fill_): hand them a copy
        # (LSTM B=64 T=50 H=256 training on the 2-core VM: 0.07 ms of an 81 ms call).
        x = x.clone()
    output = x.transpose(0, 1) if batch_first else x
    h_n = torch.cat(h_n) if num_layers > 1 else h_n[0]
    c_n = (torch.cat(c_n) if num_layers > 1 else c_n[0]) if cell in LSTM_CELLS else None
    if compute_dtype != out_dtype:
        output, h_n, c_n = output.to(out_dtype), h_n.to(out_dtype), _cast(c_n, out_dtype)
    return output, h_n, c_n


def cell_step(cell: str, input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], hx=None, peephole: Optional[Tensor] = None):
    """One step of a cell (LSTMCell/GRUCell/RNNCell): on CPU float32/float64 torch GEMMs and a
    native pointwise pass (_cell_step.py), elsewhere the recurrence as a sequence of T=1.

    input [B, I]; hx: h [B, H], or for LSTM (h, c), None for zeros; peephole: an LSTM's
    peephole weights (rnn's sixth LayerWeights entry) or None.
    Returns h' [B, H], or for LSTM (h', c').
    """
    lstm_pair = cell in LSTM_CELLS and isinstance(hx, (tuple, list)) and len(hx) == 2
    if hx is None or lstm_pair or (cell not in LSTM_CELLS and isinstance(hx, Tensor)):
        h, c = hx if lstm_pair else (hx, None)
        if (_cell_step.applies(input) and not torch.is_autocast_enabled(input.device.type)
                and _cell_step.operand_problem(cell, input.dtype, input.size(0), input.size(1),
                                               h, c, w_ih, w_hh, b_ih, b_hh,
                                               peephole=peephole) is None):
            return _cell_step.step(cell, input, h, c, w_ih, w_hh, b_ih, b_hh, checked=True,
                                   peephole=peephole)
    # Everything else, bad input included, as a sequence of one step through rnn()'s checks.
    if hx is not None:
        hx = tuple(s.unsqueeze(0) for s in hx) if cell in LSTM_CELLS else hx.unsqueeze(0)
    weights = (w_ih, w_hh, b_ih, b_hh, None) + ((peephole,) if peephole is not None else ())
    _, h_n, c_n = rnn(cell, input.unsqueeze(0), [weights], hx)
    return (h_n[0], c_n[0]) if cell in LSTM_CELLS else h_n[0]


# --- one layer ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _LayerSpec:
    """What a layer's recurrence needs to know besides its tensors."""
    cell: str
    directions: int
    has_bias: bool
    has_proj: bool
    has_peephole: bool = False

    def split(self, params):
        """A flat sequence (w_hh x D, then b_hh x D with bias, w_hr x D with proj, peephole x D
        with peephole connections) back into w_hh, b_hh, w_hr, peephole tuples of D entries,
        Nones for the absent ones."""
        d = self.directions
        w_hh, rest = tuple(params[:d]), params[d:]
        b_hh, rest = (tuple(rest[:d]), rest[d:]) if self.has_bias else ((None,) * d, rest)
        w_hr, rest = (tuple(rest[:d]), rest[d:]) if self.has_proj else ((None,) * d, rest)
        peephole = tuple(rest[:d]) if self.has_peephole else (None,) * d
        return w_hh, b_hh, w_hr, peephole


def _layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor], c0: Optional[Tensor],
           lengths: Optional[Tensor], trace_save: bool = False):
    """x [T, B, I] -> (out [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None). trace_save:
    while tracing, save for backward (rnn())."""
    _check_bias_shapes(layer_weights)
    if _backend.under_transform():
        return _reference_layer(cell, x, layer_weights, h0, c0, lengths)
    peephole = peephole_weights(layer_weights)
    if _backend.recording_graph() and _onnx_export.active():
        if peephole:
            return _onnx_export.peephole_layer(cell, x, layer_weights, h0, c0, lengths)
        return _onnx_export.layer(cell, x, layer_weights, h0, c0, lengths)
    if x.size(0) == 1 and lengths is None and _one_step_applies(cell, x, layer_weights, h0, c0):
        out, hn, cn = _cell_step.layer(cell, x[0], layer_weights, h0, c0)
        return out.unsqueeze(0), hn, cn
    has_bias = layer_weights[0][2] is not None
    # Concatenating the directions' W_ih, b_ih + b_hh, and the input projection of a
    # non-contiguous x would each promote a weight of another dtype silently; torch.nn refuses it
    # (on its main path: its own non-contiguous paths promote a bias, GRUCell's does not, so
    # torch.nn's answer depended on x's strides).
    for w in layer_weights:
        for name, t in (("w_ih", w[0]),) + ((("b_ih", w[2]), ("b_hh", w[3])) if has_bias else ()):
            if t.dtype != x.dtype or t.device != x.device:
                raise RuntimeError(
                    f"fusedrnn.functional.rnn: {name} must be {x.dtype} on {x.device} like "
                    f"the input, got {t.dtype} on {t.device}")
    w_ih = torch.cat([w[0] for w in layer_weights]) if len(layer_weights) > 1 else layer_weights[0][0]
    fold_bias = has_bias and folds_bias(cell, x.dtype, x.device)
    b_ih = None
    if has_bias and not fold_bias:
        b_ih = torch.cat([w[2] for w in layer_weights]) if len(layer_weights) > 1 else layer_weights[0][2]
    xproj = _input_projection.project(x, w_ih, b_ih)  # [T, B, D*G*H]: all directions, one GEMM

    w_hh = [w[1] for w in layer_weights]
    b_hh = ([w[2] + w[3] for w in layer_weights] if fold_bias
            else [w[3] for w in layer_weights] if has_bias else [])
    w_hr = [w[4] for w in layer_weights] if layer_weights[0][4] is not None else []
    needs_grad = trace_save or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (xproj, h0, c0, *w_hh, *b_hh, *w_hr, *peephole)))
    if _backend.recording_graph() or _backend.without_data(xproj):
        # torch.compile traces the custom op (its fake kernel gives the shapes) and, in training,
        # the backward formula registered for it: no graph break. torch.jit.trace records it as
        # an op of the traced graph; meta and fake tensors get the fake kernel's results.
        out, hn, cn = layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, peephole, lengths,
                                    needs_grad)[:3]
        return out, hn, (cn if cell in LSTM_CELLS else None)
    # Eagerly the autograd.Function runs the same forward and backward without the custom op's
    # dispatch (several Python layers, measurable at B=1), with the op's checks: rnn() is public,
    # and the kernels trust every size (lengths values were checked by _checked_lengths).
    _validation.check_layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, False,
                                    op="fusedrnn.functional.rnn", peephole=peephole)
    spec = _LayerSpec(cell, len(w_hh), has_bias, bool(w_hr), bool(peephole))
    if needs_grad:
        results = _LayerRecurrence.apply(spec, lengths, xproj, h0, c0, (x, w_ih, b_ih), *w_hh,
                                         *b_hh, *w_hr, *peephole)
        return results[0], results[1], (results[2] if cell in LSTM_CELLS else None)
    num_dirs = len(w_hh)
    out, hn, cn, *_ = _run_forward(cell, xproj, h0, c0, w_hh, _per_direction(b_hh, num_dirs),
                                   _per_direction(w_hr, num_dirs), lengths, save=False,
                                   peephole=peephole)
    return out, hn, cn


def _check_bias_shapes(layer_weights) -> None:
    """Every bias of shape [G*H]. torch.nn's CPU modules also take one that broadcasts ([1] or
    [1, G*H]); fusedrnn refuses it on every path (the README's list of what torch.nn takes by
    accident). The kernels read b_hh as [G*H]; where b_ih + b_hh is folded first, a [1] bias
    used to pass unseen (found by fuzzing: an LSTM ran, a GRU with the same bias_hh raised,
    naming b_hh also when bias_ih was the odd one)."""
    for d, w in enumerate(layer_weights):
        rows = w[1].shape[0]
        for name, b in (("b_ih", w[2]), ("b_hh", w[3])):
            if b is not None and b.shape != (rows,):
                raise RuntimeError(f"fusedrnn.functional.rnn: {name} must have shape [G*H] = "
                                   f"[{rows}] like W_hh's rows, got {list(b.shape)} (layer "
                                   f"weights entry {d})")


def peephole_weights(layer_weights) -> list:
    """The D [3, H] peephole weights of a layer's LayerWeights (their sixth entry,
    reference.py), or [] for a layer without peephole connections."""
    present = [len(w) > 5 and w[5] is not None for w in layer_weights]
    if not any(present):
        return []
    if not all(present):
        raise ValueError("fusedrnn.functional.rnn: a layer's directions must all have peephole "
                         "weights (a sixth LayerWeights entry) or none, got them for direction(s) "
                         f"{[d for d, there in enumerate(present) if there]} only")
    return [w[5] for w in layer_weights]


def folds_bias(cell: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a layer with both biases hands the kernel b_ih + b_hh and projects x without b_ih
    (functional._layer, the inference plan and the TorchScript path all ask this).

    LSTM and RNN add b_ih and b_hh to the same pre-activation: the kernel adds b_ih + b_hh once
    and the projection is a plain GEMM. That saves addmm's broadcast copy of the bias into its
    [T*B, D*G*H] result, and backward sums the pre-activation gradient once (the add's backward
    hands that one sum to both biases) instead of once per bias. GRU's b_hn sits inside
    r * (W_hn h + b_hn), so a GRU keeps b_ih in the projection. So do bfloat16 layers on the CPU:
    b_ih + b_hh would round the sum to bfloat16, where the GEMM adds b_ih before its one rounding
    and the kernel widens b_hh exactly."""
    return cell != "gru" and not (dtype == torch.bfloat16 and device.type == "cpu")


def _reference_layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor],
                     c0: Optional[Tensor], lengths: Optional[Tensor]):
    """_layer under a torch.func transform (_backend.under_transform): the layer as
    fusedrnn.reference.rnn, plain torch ops that grad, jvp and vmap all support."""
    ref_cell, coupled = _backend.reference_cell(cell)
    return reference.rnn(ref_cell, x, layer_weights, (h0, c0) if cell in LSTM_CELLS else h0,
                         bidirectional=len(layer_weights) == 2, lengths=lengths,
                         coupled_input_forget=coupled)


def _one_step_applies(cell, x, layer_weights, h0, c0) -> bool:
    """Whether a one-step layer runs as cell steps (_cell_step.layer): on what _cell_step runs,
    with states of the expected shapes (anything else takes the recurrence, which reports it)."""
    return (_cell_step.applies(x, dims=3)
            and _cell_step.layer_problem(cell, x.dtype, x.size(1), x.size(2), layer_weights, h0,
                                         c0) is None)


def _empty_layer(cell: str, x: Tensor, layer_weights, num_directions: int,
                 h0: Optional[Tensor], c0: Optional[Tensor]):
    """B = 0 or H = 0 (torch.nn accepts both): nothing to run, empty results of the right shapes."""
    w_hh = layer_weights[0][1]
    hidden = w_hh.size(0) // GATE_COUNT[cell]
    state = w_hh.size(1)
    seq_len, batch = x.shape[0], x.shape[1]
    # Keep the autograd graph connected to what a real run would read: the gradients are zeros
    # (of no elements where B = 0), not None. Every result has no elements, so a non-finite sum
    # cannot show. The one exception is c_n after a single step, which W_hr (index 4) has not
    # reached yet: its gradient stays None there, as torch.nn's does.
    def zero(skip_projection: bool = False):
        operands = [w for ws in layer_weights for i, w in enumerate(ws)
                    if not (skip_projection and i == 4)] + [x, h0, c0]
        return sum(t.sum() * 0 for t in operands if t is not None)
    out = x.new_zeros(seq_len, batch, num_directions * state) + zero()
    hn = x.new_zeros(num_directions, batch, state) + zero()
    cn = (x.new_zeros(num_directions, batch, hidden) + zero(skip_projection=seq_len == 1)
          if cell in LSTM_CELLS else None)
    return out, hn, cn


# --- the native recurrence of a layer: the one implementation behind both the autograd.Function
# (eager) and the custom ops (torch.compile) ---------------------------------------------------------
#
# Tensors of a layer: xproj [T, B, D*G*H] (last dim dense); h0 [D, B, P], c0 [D, B, H] contiguous
# or None; w_hh, b_hh, w_hr sequences of D tensors, or of D Nones where absent.

def _forward_outputs(cell: str, xproj: Tensor, num_dirs: int, state: int, has_proj: bool,
                     lengths: Optional[Tensor], save: bool, zero_padding: bool = False,
                     gates_over_xproj: bool = False, has_peephole: bool = False):
    """Allocates what a layer's forward writes: (out, hn, cn, gates, c_seq, r_seq), None where
    the cell or mode has none; gates, c_seq, r_seq only when saving for backward. Also the fake
    kernel of layer_forward, so torch.compile sees exactly the eager shapes and strides.

    The kernels leave the rows of padded steps (lengths given) of gates, c_seq and r_seq
    unwritten. Only the dW_hr GEMM reads them (r_seq, times a zero gradient): zeros there keep
    garbage (NaN * 0) out of it. zero_padding zeros gates and c_seq too (the op's outputs must not
    depend on uninitialised memory; eagerly they are private to the autograd.Function).
    A peephole LSTM's c_seq is always zero there: its weight gradients read every row
    (_peephole_grad). gates_over_xproj: the gates are xproj itself (see
    _gates_can_overwrite_xproj)."""
    is_lstm = cell in LSTM_CELLS
    seq_len, batch = xproj.shape[0], xproj.shape[1]
    hidden = xproj.shape[2] // num_dirs // GATE_COUNT[cell]
    out = xproj.new_empty(seq_len, batch, num_dirs * state)
    hn = xproj.new_empty(num_dirs, batch, state)
    cn = xproj.new_empty(num_dirs, batch, hidden) if is_lstm else None
    gates = c_seq = r_seq = None
    if save:
        padded = lengths is not None
        saved = xproj.new_zeros if padded and zero_padding else xproj.new_empty
        saved_width = SAVED_GATE_COUNT[cell] * hidden
        if gates_over_xproj:  # [D, T, B, S*H] view: direction d's gates over its xproj columns
            gates = xproj.view(seq_len, batch, num_dirs, -1).permute(2, 0, 1, 3)
        else:
            gates = saved(num_dirs, seq_len, batch, saved_width) if saved_width else None
        c_saved = xproj.new_zeros if padded and has_peephole else saved
        c_seq = c_saved(num_dirs, seq_len, batch, hidden) if is_lstm else None
        if has_proj:
            r_seq = (xproj.new_zeros if padded else xproj.new_empty)(
                num_dirs, seq_len, batch, hidden)
    return out, hn, cn, gates, c_seq, r_seq


def _run_forward(cell: str, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, save: bool,
                 zero_padding: bool = False, xproj_is_scratch: bool = False, peephole=()):
    """Allocates the outputs (and, with save, what backward needs) and runs the native forward of
    all directions in one call. Returns _forward_outputs' tuple. The callers have checked the
    arguments (the native call trusts their sizes, dtype and device).

    xproj_is_scratch: the caller owns xproj and will not read it again, so where the backend
    allows it the saved gates overwrite it instead of taking a tensor of their own."""
    over = xproj_is_scratch and save and _gates_can_overwrite_xproj(cell, xproj)
    results = _forward_outputs(cell, xproj, len(w_hh), w_hh[0].shape[1], w_hr[0] is not None,
                               lengths, save, zero_padding, gates_over_xproj=over,
                               has_peephole=bool(peephole))
    out, hn, cn, gates, c_seq, r_seq = results
    _backend.forward_layer(cell, xproj, [w.contiguous() for w in w_hh],
                           [_contiguous(b) for b in b_hh], [_contiguous(w) for w in w_hr],
                           h0, c0, out, hn, cn, gates, c_seq, r_seq, lengths,
                           _present_contiguous(peephole))
    return results


def _backward_outputs(cell: str, out: Tensor, num_dirs: int, gates_width: int, state: int,
                      has_proj: bool, d_xproj: Optional[Tensor] = None):
    """Allocates what the native backward writes: (d_xproj, d_hproj, d_h_seq, d_h0, d_c0), None
    where the cell has none (d_xproj: given, see _run_backward). Also the fake kernel of
    layer_backward."""
    seq_len, batch = out.shape[0], out.shape[1]
    hidden = gates_width // GATE_COUNT[cell]
    if d_xproj is None:
        d_xproj = out.new_empty(seq_len, batch, num_dirs * gates_width)
    # LSTM and RNN: the gradient of the recurrent product equals d_xproj (params.h).
    d_hproj = out.new_empty(seq_len, batch, num_dirs * gates_width) if cell == "gru" else None
    d_h_seq = out.new_empty(num_dirs, seq_len, batch, state) if has_proj else None
    d_h0 = out.new_empty(num_dirs, batch, state)
    d_c0 = out.new_empty(num_dirs, batch, hidden) if cell in LSTM_CELLS else None
    return d_xproj, d_hproj, d_h_seq, d_h0, d_c0


def _run_backward(cell: str, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out, d_hn, d_cn,
                  lengths, peephole=(), d_xproj_over_gates: bool = False):
    """The native backward recurrence of all directions in one call (d_out, d_hn, d_cn: None
    for zero). Returns _backward_outputs' tuple.

    d_xproj_over_gates: the gates lie over the forward's xproj (_gates_can_overwrite_xproj) and
    are read by nothing after this call, so d_xproj is written over them, in that buffer."""
    d_xproj = None
    if d_xproj_over_gates:
        d_xproj = gates.permute(1, 2, 0, 3).reshape(gates.shape[1], gates.shape[2], -1)
    grads = _backward_outputs(cell, out, len(w_hh), w_hh[0].shape[0], w_hh[0].shape[1],
                              w_hr[0] is not None, d_xproj)
    _backend.backward_layer(
        cell, [w.contiguous() for w in w_hh], [_contiguous(b) for b in b_hh],
        [_contiguous(w) for w in w_hr], h0, c0, out, gates, c_seq, _last_dim_contiguous(d_out),
        _contiguous(d_hn), _contiguous(d_cn), *grads, lengths, _present_contiguous(peephole))
    return grads


def _layer_grads(spec: _LayerSpec, saved, d_out, d_hn, d_cn, needs, run_backward,
                 given: Optional[tuple] = None) -> tuple:
    """The gradients of a layer's recurrence: (d_xproj, d_h0, d_c0, then one per flat param:
    w_hh x D, b_hh x D with bias, w_hr x D with proj, peephole x D), None where not needed.

    saved: (lengths, h0, c0, out, gates, c_seq, r_seq, *params) as the forward saved them;
    needs: one bool per flat param; run_backward: _run_backward, or while compiling the
    layer_backward op around it; given: whether the layer had h0 and c0, where the saved ones
    may be None without meaning zeros (_first_order_reads). The native backward gives the
    gradients of xproj and the states and the gate pre-activation gradients; torch GEMMs turn
    those into dW_hh, db_hh and dW_hr. With create_graph (reached only by the custom op: the
    eager Function recomputes, _recomputed_grads) the results are tagged so that
    differentiating them raises."""
    # Compiled graphs never differentiate their backward (AOTAutograd refuses double backward
    # itself), so no tag is traced into them.
    create_graph = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    with torch.no_grad():
        grads = _layer_weight_grads(spec, saved, d_out, d_hn, d_cn, needs, run_backward, given)
    return _NoDoubleBackward.mark(grads, (*saved, d_out, d_hn, d_cn)) if create_graph else grads


def _layer_weight_grads(spec: _LayerSpec, saved, d_out, d_hn, d_cn, needs, run_backward,
                        given: Optional[tuple] = None):
    lengths, h0, c0, out, gates, c_seq, r_seq, *params = saved
    has_h0, has_c0 = given if given is not None else (h0 is not None, c0 is not None)
    w_hh, b_hh, w_hr, peephole = spec.split(params)
    num_dirs = spec.directions
    d_xproj, d_hproj, d_h_seq, d_h0, d_c0 = run_backward(
        spec.cell, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out, d_hn, d_cn, lengths,
        peephole if spec.has_peephole else ())
    gates_width = d_xproj.shape[2] // num_dirs
    state, hidden = out.shape[2] // num_dirs, gates_width // GATE_COUNT[spec.cell]

    d_pre = d_hproj if d_hproj is not None else d_xproj
    # needs: w_hh x D, then b_hh x D, w_hr x D, peephole x D where the layer has them.
    needs_bias = needs[num_dirs:] if spec.has_bias else ()
    needs_proj = needs[num_dirs * (1 + spec.has_bias):] if spec.has_proj else ()
    needs_peephole = needs[num_dirs * (1 + spec.has_bias + spec.has_proj):]
    d_bias = None
    if spec.has_bias and any(needs_bias[:num_dirs]):
        d_bias = _input_projection.row_sum(d_pre)  # every direction's db_hh at once
    # W_hr is read only where a step's h is made: with one step and no gradient on out or h_n
    # (a loss on c_n alone), nothing reaches it, and torch.nn leaves its grad None, not zeros.
    reaches_w_hr = d_out is not None or d_hn is not None or out.shape[0] > 1
    d_w_hh, d_b_hh, d_w_hr, d_peephole = [], [], [], []
    for d in range(num_dirs):
        d_pre_d = d_pre[:, :, d * gates_width:(d + 1) * gates_width]
        d_w_hh.append(_recurrent_weight_grad(d_pre_d, out[:, :, d * state:(d + 1) * state],
                                             h0[d] if h0 is not None else None, lengths,
                                             reverse=d == 1)
                      if needs[d] else None)
        if spec.has_bias:
            d_b_hh.append(d_bias[d * gates_width:(d + 1) * gates_width]
                          if needs_bias[d] else None)
        if spec.has_proj:
            # dW_hr = sum_t d_h_t^T r_t, with r_t = o_t * tanh(c_t) the input of W_hr.
            d_w_hr.append(d_h_seq[d].reshape(-1, state).t().mm(r_seq[d].reshape(-1, hidden))
                          if needs_proj[d] and reaches_w_hr else None)
        if spec.has_peephole:
            d_peephole.append(_peephole_grad(d_pre[:, :, d * gates_width:(d + 1) * gates_width],
                                             c_seq[d], c0[d] if c0 is not None else None,
                                             lengths, reverse=d == 1,
                                             coupled=spec.cell == "lstm_cifg")
                              if needs_peephole[d] else None)
    return (d_xproj, d_h0 if has_h0 else None, d_c0 if has_c0 else None,
            *d_w_hh, *d_b_hh, *d_w_hr, *d_peephole)


def _first_order_reads(spec: _LayerSpec, seq_len: int, h0: Optional[Tensor],
                       c0: Optional[Tensor], needs) -> tuple:
    """What a layer's first-order backward reads of h0, c0 and W_hh, given which of the
    layer's inputs need a gradient (needs: _LayerRecurrence's needs_input_grad): (h0 or a
    private copy of it or None, c0 or None, whether W_hh is read). Only these are saved; the
    states follow the cell step's rules (_cell_step.states_read_by_backward). W_hh carries a
    gradient to an earlier state: read after more than one step, or for dh0 (a weight written
    in place after a one-step forward, with no gradient for h0, is fine, as in torch.nn)."""
    h0_read, c0_read = _cell_step.states_read_by_backward(
        spec.cell, h0, c0, w_hh_needs_grad=any(needs[6:6 + spec.directions]),
        more_than_c_needs_grad=any(needs[2:4]) or any(needs[5:]), peephole=spec.has_peephole)
    return h0_read, c0_read, seq_len > 1 or needs[3]


def _peephole_grad(d_pre: Tensor, c_seq: Tensor, c0: Optional[Tensor],
                   lengths: Optional[Tensor], reverse: bool, coupled: bool = False) -> Tensor:
    """d(w_ci, w_cf, w_co) [3, H] = sums over steps and rows of (d_i c_{t-1}, d_f c_{t-1},
    d_o c_t) for one direction: d_pre [T, B, 4H] the gate pre-activation gradients (zero rows at
    padded steps), c_seq [T, B, H] the cell states after each step (zero rows at padded steps:
    _forward_outputs), c0 [B, H] or None for zeros. coupled (a CIFG): d_pre [T, B, 3H] of f, g, o
    (d_f counts the input gate's share too) and d(w_cf, w_co) [2, H].

    c_{t-1} (params.h) is c_seq one step earlier in processing order: c_seq[t-1] going forward,
    c_seq[t+1] going backward (a padded row, zero, at each sequence's last valid step), and c0 at
    each sequence's first step."""
    seq_len, batch = d_pre.shape[0], d_pre.shape[1]
    if coupled:
        d_f, _, d_o = d_pre.chunk(3, dim=2)
        seeing_c_prev = (d_f,)
    else:
        d_i, d_f, _, d_o = d_pre.chunk(4, dim=2)
        seeing_c_prev = (d_i, d_f)
    grads = None
    if seq_len > 1:  # (a single step, a cell step's, has nothing but c0 before it)
        now, before = ((slice(None, -1), slice(1, None)) if reverse
                       else (slice(1, None), slice(None, -1)))
        grads = [(d[now] * c_seq[before]).sum((0, 1)) for d in seeing_c_prev]
    first = _first_step(seq_len, batch, lengths, reverse, d_pre.device)
    at_first = [(d[first] * c0).sum(0) if c0 is not None else _times_zero_state(d[first])
                for d in seeing_c_prev]
    grads = at_first if grads is None else [g + a for g, a in zip(grads, at_first)]
    return torch.stack([*grads, (d_o * c_seq).sum((0, 1))])


class _LayerRecurrence(torch.autograd.Function):
    """The recurrence of all directions of one layer, eagerly. Inputs: spec, lengths,
    xproj [T, B, D*G*H], h0 [D, B, P] or None, c0 [D, B, H] or None, projection (x, w_ih, b_ih)
    whose F.linear is xproj (for create_graph: _recomputed_grads), then w_hh x D, b_hh x D
    (with bias), w_hr x D (with proj), peephole x D (with peephole connections). Outputs:
    out [T, B, D*P], hn [D, B, P] (and cn [D, B, H] for LSTM)."""

    @staticmethod
    def forward(ctx, spec: _LayerSpec, lengths, xproj, h0, c0, projection, *params):
        w_hh, b_hh, w_hr, peephole = spec.split(params)
        # Kept by reference, not saved (a bias written in place before a first-order backward,
        # which reads none of them, is fine, as in torch.nn); read only under create_graph,
        # which checks their versions. So are the states and W_hh where the first-order backward
        # does not read them (_first_order_reads).
        ctx.projection, ctx.b_hh, ctx.states, ctx.w_hh = projection, b_hh, (h0, c0), w_hh
        ctx.kept_versions = _recomputed_grads.versions(_LayerRecurrence._kept(ctx))
        needs = ctx.needs_input_grad
        h0_read, c0_read, w_hh_read = _first_order_reads(spec, xproj.shape[0], h0, c0, needs)
        # Only W_hr needs a gradient, and one step's c_n does not depend on it (r_1 W_hr^T makes
        # h_1, after c_1): c_n then requires no grad, as torch.nn's.
        w_hh_needs, b_hh_needs, _, peephole_needs = spec.split(needs[6:])
        c_n_constant = spec.has_proj and xproj.shape[0] == 1 and not any(
            (*needs[2:5], *w_hh_needs, *b_hh_needs, *peephole_needs))
        # xproj is _layer's own projection, read by nothing after this call (its autograd node,
        # the linear's, keeps its inputs, not its result): the gates may overwrite it.
        out, hn, cn, gates, c_seq, r_seq = _run_forward(
            spec.cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, save=True,
            xproj_is_scratch=True, peephole=peephole if spec.has_peephole else ())
        ctx.spec = spec
        ctx.gates_over_xproj = gates is not None and gates.data_ptr() == xproj.data_ptr()
        ctx.set_materialize_grads(False)
        if c_n_constant:
            ctx.mark_non_differentiable(cn)
        ctx.given = (h0 is not None, c0 is not None)
        kept_params = (*(w_hh if w_hh_read else (None,) * spec.directions),
                       *_unsaved_biases(spec, params)[spec.directions:])
        ctx.save_for_backward(lengths, h0_read, c0_read, out, gates, c_seq, r_seq, *kept_params)
        return (out, hn, cn) if spec.cell in LSTM_CELLS else (out, hn)

    @staticmethod
    @_backend.never_traced
    def backward(ctx, d_out, d_hn, d_cn=None):
        # Where the gates lie over the forward's xproj, d_xproj can take that buffer over: no
        # new [T, B, D*4H] tensor (its page faults: ~1500 per layer of a bidirectional B=32
        # T=100 H=256 LSTM), and each d_xproj store hits the line its gates load just fetched.
        # Measured on the 2-core VM, LSTM training calls: B=64 T=50 H=256 38.6-42.1 -> 36.1-39.3
        # ms, H=512 143.6-146.4 -> 140.7-141.6 ms. Not when the graph is kept (retain_graph,
        # create_graph): a second backward reads the same saved gates again.
        if _recomputed_grads.applies((d_out, d_hn, d_cn)):  # create_graph, or batched gradients
            _recomputed_grads.check_unchanged(_LayerRecurrence._kept(ctx), ctx.kept_versions)
            lengths, _, _, _, _, _, _, *params = ctx.saved_tensors  # as _layer_weight_grads
            _, _, w_hr, peephole = ctx.spec.split(params)
            (h0, c0), w_hh = ctx.states, ctx.w_hh
            needs = ctx.needs_input_grad
            grads = _recomputed_grads.layer_grads(
                ctx.spec.cell, ctx.projection, lengths, h0, c0, w_hh, ctx.b_hh, w_hr,
                (d_out, d_hn, d_cn), (*needs[2:5], *needs[6:]),
                peephole if ctx.spec.has_peephole else ())
            return (None, None, *grads[:3], None, *grads[3:])
        run_backward = _run_backward
        if ctx.gates_over_xproj and not torch._C._autograd._get_current_graph_task_keep_graph():
            run_backward = functools.partial(_run_backward, d_xproj_over_gates=True)
        saved = ctx.saved_tensors
        if saved[7] is None:  # W_hh unsaved: not read (_first_order_reads), any values will do
            saved = (*saved[:7], *ctx.w_hh, *saved[7 + ctx.spec.directions:])
        grads = _layer_grads(ctx.spec, saved, d_out, d_hn, d_cn, ctx.needs_input_grad[6:],
                             run_backward, ctx.given)
        return (None, None, *grads[:3], None, *grads[3:])

    @staticmethod
    def _kept(ctx) -> tuple:
        """What the forward kept by reference, in the order of ctx.kept_versions."""
        return (*ctx.projection, *ctx.b_hh, *ctx.states, *ctx.w_hh)


class _NoDoubleBackward(torch.autograd.Function):
    """Tags gradients computed with create_graph=True by the layer_forward op outside a
    compiled graph (a traced or scripted model run eagerly) so that differentiating them again
    raises (the native backward is not itself differentiable; torch.nn's cuDNN RNNs behave the
    same), instead of silently missing the second-order terms of the recurrence."""

    @staticmethod
    def mark(grads: tuple, computed_from) -> tuple:
        """grads, each behind the tag's node; computed_from: every tensor they were computed
        from (saved inputs and outputs, incoming gradients). The node takes those as inputs too,
        so that every path from a gradient back to a leaf runs through it. With the gradients
        alone as its inputs (once_differentiable's way), torch.autograd.grad(penalty(grads),
        params) found no path through the node, never ran it, and returned only the terms of
        the differentiable ops after the recurrence (the input GEMM's): a silently wrong
        gradient penalty."""
        tensors = [g for g in grads if g is not None]
        sources = [t for t in computed_from if isinstance(t, Tensor) and t.requires_grad]
        # Detached inputs that require grad give the outputs a grad_fn even where no source
        # requires grad (like once_differentiable).
        marked = iter(_NoDoubleBackward.apply(
            len(tensors), *(t.detach().requires_grad_() for t in tensors), *sources))
        return tuple(next(marked) if g is not None else None for g in grads)

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


_DOUBLE_BACKWARD_ERROR = (
    "fusedrnn: double backward (differentiating a gradient of an LSTM/GRU/RNN) is not supported "
    "in a traced, scripted or compiled graph, like torch.nn's cuDNN RNNs; run the model eagerly "
    "(create_graph then recomputes the layers as fusedrnn.reference's ops) or use torch.func")


def _unsaved_biases(spec: _LayerSpec, params) -> tuple:
    """A layer's flat params as its backward keeps them: b_hh as None. The backward reads no
    bias value (params.h), so a bias written in place between forward and backward is fine, as in
    torch.nn (saved, its version check would raise); create_graph's tag still reaches b_hh
    through the saved `out`, an output of the node b_hh is an input of."""
    d = spec.directions
    if not spec.has_bias:
        return tuple(params)
    return (*params[:d], *(None,) * d, *params[2 * d:])


def _gates_can_overwrite_xproj(cell: str, xproj: Tensor) -> bool:
    """Whether the native forward may write the saved gates over xproj (params.h): the CPU
    kernel reads a row's xproj before it writes that row's gates, for the same units on the same
    thread, so an LSTM (4H gates saved per direction, 4H of xproj; a CIFG 3H and 3H) can save its
    gates in place, each direction over its own columns. That saves a [D, T, B, S*H] tensor per
    layer and call, its page faults and its traffic: each gates store hits the line its xproj
    load just fetched."""
    return (cell in LSTM_CELLS and xproj.device.type == "cpu" and _backend.backend_name() == "cpu"
            and xproj.is_contiguous())


def _recurrent_weight_grad(d_pre: Tensor, out: Tensor, h0: Optional[Tensor],
                           lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """dW_hh = sum_t d_pre_t^T h_prev_t for one direction, as two GEMMs and no copy of h_prev.

    h_prev_t (params.h) is out_{t-1} going forward (h0 at t = 0), out_{t+1} going backward (h0 at
    each sequence's last valid step). Rows where h_prev is a padded output are zeros (and padded
    steps have zero gradient rows), so only the h0 rows need the lengths.
    """
    seq_len, batch, gates_width = d_pre.shape
    state = out.shape[2]
    if reverse:
        grad = _input_projection.weight_grad(d_pre[:-1].reshape(-1, gates_width),
                                             out[1:].reshape(-1, state))
    else:
        grad = _input_projection.weight_grad(d_pre[1:].reshape(-1, gates_width),
                                             out[:-1].reshape(-1, state))
    first = d_pre[_first_step(seq_len, batch, lengths, reverse, d_pre.device)]
    if h0 is not None:
        grad.addmm_(first.t(), h0)  # in place: grad is this function's own fresh result
    else:
        grad.add_(_times_zero_state(first).unsqueeze(1))
    return grad


def _first_step(seq_len: int, batch: int, lengths: Optional[Tensor], reverse: bool,
                device: torch.device):
    """The index, into a [T, B, ...] tensor, of each sequence's first step in processing order
    (the step that reads h0 and c0): 0 going forward, each sequence's last valid step going
    backward."""
    if not reverse:
        return 0
    if lengths is None:
        return seq_len - 1
    return (lengths - 1, torch.arange(batch, device=device))


def _times_zero_state(rows: Tensor) -> Tensor:
    """What rows^T times a zero initial state sums to, per column of rows: zero, or NaN where the
    column holds a NaN or an infinity. torch.nn multiplies its zero h0 (and c0) by the first
    step's gate gradients; the kernels skip that product, which would turn a NaN in x into a zero
    W_hh gradient where torch.nn's is NaN (found by fuzzing: a packed batch whose longest sequence
    is 1). An elementwise pass over one step's rows, no GEMM and no host sync."""
    return (rows * 0).sum(0)


# --- the custom ops (torch.library): what torch.compile traces ---------------------------------------
#
# A native call takes data pointers, which torch.compile cannot trace; as custom ops with fake
# kernels (shapes only) and a registered backward formula, a whole LSTM/GRU/RNN compiles with
# fullgraph=True, forward and backward. The schema has no None outputs and no dataclasses: the
# layer's spec travels as cell, the list lengths (D directions; an empty b_hh or w_hr list means
# no bias or no projection) and save; an output the cell or mode has no use for (cn of GRU/RNN,
# gates/c_seq/r_seq without save, d_hproj/d_h_seq/d_c0 of cells without them) is an empty tensor.

def _none_as_empty(tensors, like: Tensor) -> tuple:
    return tuple(t if t is not None else like.new_empty(0) for t in tensors)


def _per_direction(tensors, num_dirs: int):
    """An op's list argument (empty where absent) as D tensors or D Nones."""
    return tuple(tensors) if tensors else (None,) * num_dirs


@torch.library.custom_op("fusedrnn::layer_forward", mutates_args=())
def layer_forward(cell: str, xproj: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                  w_hh: list[Tensor], b_hh: list[Tensor], w_hr: list[Tensor],
                  peephole: list[Tensor], lengths: Optional[Tensor], save: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The recurrence of all D directions of a layer: xproj [T, B, D*G*H] = x W_ih^T (+ b_ih),
    w_hh/b_hh/w_hr/peephole lists of D tensors (b_hh, w_hr, peephole empty when absent;
    peephole [3, H], a CIFG's [2, H], LSTMs only), h0 [D, B, P], c0 [D, B, H], lengths [B]
    int64. Returns (out [T, B, D*P], hn [D, B, P], cn [D, B, H], then with save what backward
    reads: gates [D, T, B, S*H], c_seq and r_seq [D, T, B, H], zero at padded steps); empty
    where absent. Bad arguments raise (_validation.check_layer_forward) before any native
    call: the kernels trust every size."""
    _validation.check_layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths,
                                    lengths is not None and not _native_checks_lengths(xproj),
                                    peephole=peephole)
    num_dirs = len(w_hh)
    c0 = c0 if cell in LSTM_CELLS else None  # another cell's c0 can only be an empty placeholder
    results = _run_forward(cell, _last_dim_contiguous(xproj), _contiguous(h0), _contiguous(c0),
                           w_hh, _per_direction(b_hh, num_dirs), _per_direction(w_hr, num_dirs),
                           _contiguous(lengths), save, zero_padding=True, peephole=peephole)
    return _none_as_empty(results, xproj)


@layer_forward.register_fake
def _layer_forward_fake(cell, xproj, h0, c0, w_hh, b_hh, w_hr, peephole, lengths, save):
    _validation.check_layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, False,
                                    peephole=peephole)
    return _none_as_empty(
        _forward_outputs(cell, xproj, len(w_hh), w_hh[0].shape[1], bool(w_hr), lengths, save,
                         zero_padding=True),
        xproj)


@torch.library.custom_op("fusedrnn::layer_backward", mutates_args=())
def layer_backward(cell: str, w_hh: list[Tensor], b_hh: list[Tensor], w_hr: list[Tensor],
                   peephole: list[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                   out: Tensor,
                   gates: Optional[Tensor], c_seq: Optional[Tensor], d_out: Optional[Tensor],
                   d_hn: Optional[Tensor], d_cn: Optional[Tensor], lengths: Optional[Tensor]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward recurrence of a layer (layer_forward's arguments and saved outputs; d_out,
    d_hn, d_cn None for zero). Returns (d_xproj [T, B, D*G*H], d_hproj [T, B, D*G*H] (GRU: the
    gradient of h W_hh^T + b_hh), d_h_seq [D, T, B, P] (projected LSTM: the gradient of each
    step's projected state), d_h0 [D, B, P], d_c0 [D, B, H] (LSTM)); empty where absent.
    Bad arguments raise (_validation.check_layer_backward) before any native call."""
    _validation.check_layer_backward(cell, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out,
                                     d_hn, d_cn, lengths,
                                     lengths is not None and not _native_checks_lengths(out),
                                     peephole=peephole)
    num_dirs = len(w_hh)
    if cell not in LSTM_CELLS:  # what another cell has no use for can only be an empty placeholder
        c0 = c_seq = d_cn = None
    if not SAVED_GATE_COUNT[cell]:
        gates = None
    grads = _run_backward(cell, w_hh, _per_direction(b_hh, num_dirs),
                          _per_direction(w_hr, num_dirs), _contiguous(h0), _contiguous(c0),
                          _last_dim_contiguous(out), _contiguous(gates), _contiguous(c_seq),
                          d_out, d_hn, d_cn, _contiguous(lengths), peephole)
    return _none_as_empty(grads, out)


@layer_backward.register_fake
def _layer_backward_fake(cell, w_hh, b_hh, w_hr, peephole, h0, c0, out, gates, c_seq, d_out,
                         d_hn, d_cn, lengths):
    _validation.check_layer_backward(cell, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out,
                                     d_hn, d_cn, lengths, False, peephole=peephole)
    return _none_as_empty(
        _backward_outputs(cell, out, len(w_hh), w_hh[0].shape[0], w_hh[0].shape[1], bool(w_hr)),
        out)


def _run_backward_op(cell: str, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out, d_hn, d_cn,
                     lengths, peephole=()):
    """_run_backward through the layer_backward op (what the compiled backward graph holds)."""
    has_proj = w_hr[0] is not None
    d_xproj, d_hproj, d_h_seq, d_h0, d_c0 = layer_backward(
        cell, list(w_hh), [b for b in b_hh if b is not None], [w for w in w_hr if w is not None],
        list(peephole), h0, c0, out, gates, c_seq, d_out, d_hn, d_cn, lengths)
    return (d_xproj, d_hproj if cell == "gru" else None, d_h_seq if has_proj else None, d_h0,
            d_c0 if cell in LSTM_CELLS else None)


def _layer_forward_setup_context(ctx, inputs, output):
    cell, xproj, h0, c0, w_hh, b_hh, w_hr, peephole, lengths, save = inputs
    out, hn, cn, gates, c_seq, r_seq = output
    spec = _LayerSpec(cell, len(w_hh), bool(b_hh), bool(w_hr), bool(peephole))
    ctx.mark_non_differentiable(*output[2 if cell not in LSTM_CELLS else 3:])
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.saved = spec, save
    if save:  # what _forward_outputs allocated, Nones for the empty placeholders
        gates = gates if SAVED_GATE_COUNT[cell] else None
        c_seq = c_seq if cell in LSTM_CELLS else None
        r_seq = r_seq if spec.has_proj else None
        ctx.save_for_backward(lengths, h0, c0, out, gates, c_seq, r_seq,
                              *_unsaved_biases(spec, (*w_hh, *b_hh, *w_hr, *peephole)))


# Never traced by Dynamo: torch.autograd.grad(create_graph=True) called inside a compiled
# function (a gradient penalty compiled as a whole) over this op's node made Dynamo trace this
# backward, where is_compiling() kept _layer_grads from tagging its gradients; with
# backend="eager" the penalty's recurrent second-order terms were then dropped silently. Run
# eagerly, the tag makes differentiating them raise, as under inductor and aot_eager.
@_backend.never_traced
def _layer_forward_backward(ctx, d_out, d_hn, d_cn, *_):
    if not ctx.saved:
        raise RuntimeError("fusedrnn::layer_forward: backward needs the forward to run with "
                           "save=True (it kept nothing for backward)")
    needs = ctx.needs_input_grad  # nested as the inputs: the lists are lists of bools
    spec = ctx.spec
    grads = _layer_grads(spec, ctx.saved_tensors, d_out, d_hn,
                         d_cn if spec.cell in LSTM_CELLS else None,
                         [*needs[4], *needs[5], *needs[6], *needs[7]], _run_backward_op)
    d_xproj, d_h0, d_c0, *d_params = grads
    d_w_hh, d_b_hh, d_w_hr, d_peephole = spec.split(d_params)
    return (None, d_xproj, d_h0, d_c0, list(d_w_hh),
            list(d_b_hh) if spec.has_bias else [], list(d_w_hr) if spec.has_proj else [],
            list(d_peephole) if spec.has_peephole else [], None, None)


def _layer_backward_backward(ctx, *_):
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


torch.library.register_autograd("fusedrnn::layer_forward", _layer_forward_backward,
                                setup_context=_layer_forward_setup_context)
# The native backward is not differentiable: say so, as _NoDoubleBackward does eagerly.
torch.library.register_autograd("fusedrnn::layer_backward", _layer_backward_backward,
                                setup_context=lambda ctx, inputs, output: None)


# --- small helpers --------------------------------------------------------------------------------

def _native_checks_lengths(like: Tensor) -> bool:
    """Whether the native module checks lengths' values itself: the CPU module does (before
    reading any step; ValueError naming lengths[b]); the CUDA kernels and their emulation do not
    (on a GPU that would need a sync), so for them Python does (_validation.check_op_lengths)."""
    return not like.is_cuda and _backend.backend_name() == "cpu"


def _checked_lengths(lengths, input: Tensor, batch_first: bool) -> Tensor:
    """The kernels trust lengths (params.h): [B] int64 on the input's device, each in [1, T]."""
    seq_len, batch = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be an integer tensor of shape ({batch},) (one length per "
                         f"sequence), got {lengths.dtype} of shape {tuple(lengths.shape)}")
    if batch > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > seq_len:
            raise ValueError(f"lengths must lie in [1, {seq_len}] (the sequence length), got "
                             f"values from {low} to {high}")
    return lengths.to(device=input.device, dtype=torch.int64).contiguous()


def _compute_dtype(input: Tensor) -> torch.dtype:
    if (input.dtype in _UPCAST_ON_CPU and input.device.type == "cpu"
            and _backend.backend_name() == "cpu"):
        return torch.float32
    return input.dtype


def _cast(t, dtype):
    return t.to(dtype) if t is not None else None


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _present_contiguous(tensors) -> list:
    """A list argument with Nones for absent (_LayerSpec.split) as the native call takes it:
    the tensors, contiguous, or [] where absent."""
    return [t.contiguous() for t in tensors if t is not None]


def _last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """Sequence tensors may have any T and B strides but need a dense last dimension."""
    if t is None:
        return None
    return t if t.stride(2) == 1 else t.contiguous()
