"""The functional API: stacked LSTM/GRU/RNN layers through the native recurrence, with autograd.

Per layer (DESIGN.md, "The one idea behind the speed"):
  1. the input projection of all directions is ONE torch GEMM (the directions' W_ih concatenated),
     left to torch autograd, so dx and dW_ih are torch GEMMs too; for LSTM and RNN b_ih joins
     b_hh (the kernel adds b_ih + b_hh), so the GEMM has no bias and one sum gives both bias grads
     (not for bfloat16 on the CPU: folds_bias);
  2. `_LayerRecurrence` runs the recurrence of all directions in one native call, each direction
     writing straight into its half of the [T, B, D*P] output (strided views, no concat);
  3. its backward runs the native backward recurrence, which returns the gate pre-activation
     gradients, and turns them into dW_hh, db_hh (and dW_hr) with torch GEMMs.
Dropout between layers is torch's F.dropout on each non-last layer's output, as in torch.nn (with
lengths, on its packed rows, as torch.nn draws it behind pack_padded_sequence).
This file holds the layer loop and step 1 (`_layer`); steps 2 and 3 are _layer_recurrence.py.

Under torch.compile, steps 2 and 3 are the custom ops `fusedrnn::layer_forward` and
`fusedrnn::layer_backward` (_custom_ops.py: torch.library, with fake kernels and a registered
backward formula), so a whole network compiles with fullgraph=True; eagerly the autograd.Function
skips the ops' dispatch cost. Both run the same functions (_run_forward, _run_backward,
_layer_grads).

`rnn(...)` has the signature of `reference.rnn(...)` and the same semantics; the modules call it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import (_backend, _cell_step, _compiled_inference, _custom_ops, _input_projection,
               _layer_recurrence, _onnx_export, _packing, _validation, reference)
from ._backend import GATE_COUNT, LSTM_CELLS
# The custom ops' Python functions, public here before they had a file of their own.
from ._custom_ops import layer_backward, layer_forward  # noqa: F401
from ._layer_recurrence import _contiguous

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
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    _require_rank(input, 3, "[T, B, I] ([B, T, I] with batch_first)")
    if input.is_complex():
        raise RuntimeError(f"fusedrnn runs float32, float64, float16 and bfloat16 tensors, got "
                           f"{input.dtype} (torch.nn's CPU modules also run complex ones: "
                           f"fusedrnn.to_torch_nn(model) converts a model back)")
    num_directions = 2 if bidirectional else 1
    if len(weights) != num_layers * num_directions:
        raise ValueError(f"expected {num_layers * num_directions} layer weights "
                         f"(num_layers * num_directions), got {len(weights)}")
    for entry in weights:
        if len(entry) not in (5, 6):
            raise ValueError("each layer weights entry must be (w_ih, w_hh, b_ih, b_hh, w_hr) "
                             f"or, for a peephole LSTM, those and the peephole weights; got "
                             f"{len(entry)} entries")
    weights = _with_zero_biases(weights)
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
    order, caller_lengths = _longest_first(x, lengths), lengths
    if order is not None:
        x, lengths = x.index_select(1, order), lengths.index_select(0, order)
        h0_all, c0_all = _rows(h0_all, order), _rows(c0_all, order)
    apply_dropout = training and dropout > 0
    if dropout_fn is None and apply_dropout and lengths is not None and _packs_eagerly(lengths):
        # torch.nn's mask for lengths= on outputs whose batch rows are in `order`
        dropout_fn = functools.partial(_packing.dropout_as_packed, lengths=caller_lengths,
                                       p=dropout, batch_order=order)
    elif dropout_fn is None:
        def dropout_fn(output):
            return F.dropout(output, dropout, training=True)

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

    h_n = torch.cat(h_n) if num_layers > 1 else h_n[0]
    c_n = (torch.cat(c_n) if num_layers > 1 else c_n[0]) if cell in LSTM_CELLS else None
    # Where the output is copied anyway, a batch_first one is the copy itself rather than a
    # transposed view of it: torch.nn's GRU and RNN return no view either, and FSDP2 warns of a
    # view output (an in-place op on it would skip FSDP2's pre-backward hook).
    if order is not None:  # (a gather: the caller gets a tensor of its own)
        back = torch.argsort(order)
        h_n, c_n = h_n.index_select(1, back), _rows(c_n, back)
        output = x.transpose(0, 1).index_select(0, back) if batch_first else x.index_select(1, back)
    elif not _backend.recording_graph() and isinstance(
            x.grad_fn, _layer_recurrence._LayerRecurrence._backward_cls):
        # The last layer's node saved this very tensor (its backward reads h_{t-1} from it).
        # torch.nn's CPU RNNs return one of their own, so callers change it in place before
        # backward (`out += residual`, ReLU(inplace=True), masked_fill_): hand them a copy
        # (LSTM B=64 T=50 H=256 training on the 2-core VM: 0.07 ms of an 81 ms call).
        # (clone keeps the strides: batch_first, torch.nn's transposed ones)
        output = (x.transpose(0, 1) if batch_first else x).clone()
    else:
        output = x.transpose(0, 1) if batch_first else x
    if compute_dtype != out_dtype:
        output, h_n, c_n = output.to(out_dtype), h_n.to(out_dtype), _cast(c_n, out_dtype)
    return output, h_n, c_n


def cell_step(cell: str, input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], hx=None, peephole: Optional[Tensor] = None):
    """One step of a cell (LSTMCell/GRUCell/RNNCell): on CPU float32/float64/bfloat16 the native
    cell step (_cell_step.py: one pointwise pass, with torch's GEMMs around it where they win),
    elsewhere the recurrence as a sequence of T=1.

    input [B, I]; hx: h [B, H], or for LSTM (h, c), None for zeros; peephole: an LSTM's
    peephole weights (rnn's sixth LayerWeights entry) or None.
    Returns h' [B, H], or for LSTM (h', c').
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    _require_rank(input, 2, "[B, I]")
    if peephole is not None and cell not in LSTM_CELLS:
        raise ValueError(f"peephole weights are for the LSTM cells {LSTM_CELLS} only, not {cell!r}")
    lstm_pair = cell in LSTM_CELLS and isinstance(hx, (tuple, list)) and len(hx) == 2
    if hx is None or lstm_pair or (cell not in LSTM_CELLS and isinstance(hx, Tensor)):
        h, c = hx if lstm_pair else (hx, None)
        if (_cell_step.applies(input) and not torch.is_autocast_enabled(input.device.type)
                and _cell_step.operand_problem(cell, input.dtype, input.size(0), input.size(1),
                                               h, c, w_ih, w_hh, b_ih, b_hh,
                                               peephole=peephole) is None):
            return _cell_step.step(cell, input, h, c, w_ih, w_hh, b_ih, b_hh,
                                   peephole=peephole)
    # Everything else, bad input included, as a sequence of one step through rnn()'s checks.
    # (hx's structure first: a stacked [2, B, H] tensor iterated below read as (h, c).)
    _validation.check_rnn_state_structure(cell, hx)
    if hx is not None:
        hx = tuple(s.unsqueeze(0) for s in hx) if cell in LSTM_CELLS else hx.unsqueeze(0)
    weights = (w_ih, w_hh, b_ih, b_hh, None) + ((peephole,) if peephole is not None else ())
    _, h_n, c_n = rnn(cell, input.unsqueeze(0), [weights], hx)
    return (h_n[0], c_n[0]) if cell in LSTM_CELLS else h_n[0]


# --- one layer ------------------------------------------------------------------------------------

def _layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor], c0: Optional[Tensor],
           lengths: Optional[Tensor], trace_save: bool = False):
    """x [T, B, I] -> (out [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None). trace_save:
    while tracing, save for backward (rnn())."""
    _check_bias_shapes(layer_weights)
    if _backend.under_transform():
        return _reference_layer(cell, x, layer_weights, h0, c0, lengths)
    peephole = peephole_weights(layer_weights)
    if _backend.recording_graph() and _onnx_export.active():
        if _onnx_export.one_step_as_ops(x, lengths):
            return _reference_layer(cell, x, layer_weights, h0, c0, lengths)
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
        num_dirs = len(w_hh)
        out, hn, cn = layer_forward(cell, xproj, h0, c0, w_hh,
                                    _custom_ops.as_op_list(b_hh, num_dirs, xproj),
                                    _custom_ops.as_op_list(w_hr, num_dirs, xproj),
                                    _custom_ops.as_op_list(peephole, num_dirs, xproj), lengths,
                                    needs_grad)[:3]
        return out, hn, (cn if cell in LSTM_CELLS else None)
    # Eagerly the autograd.Function runs the same forward and backward without the custom op's
    # dispatch (several Python layers, measurable at B=1), with the op's checks: rnn() is public,
    # and the kernels trust every size (lengths values were checked by _checked_lengths).
    _validation.check_layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, False,
                                    op="fusedrnn.functional.rnn", peephole=peephole)
    spec = _layer_recurrence._LayerSpec(cell, len(w_hh), has_bias, bool(w_hr), bool(peephole))
    if needs_grad:
        results = _layer_recurrence._LayerRecurrence.apply(
            spec, lengths, xproj, h0, c0, (x, w_ih, b_ih), *w_hh, *b_hh, *w_hr, *peephole)
        return results[0], results[1], (results[2] if cell in LSTM_CELLS else None)
    num_dirs = len(w_hh)
    out, hn, cn, *_ = _layer_recurrence._run_forward(
        cell, xproj, h0, c0, w_hh, _custom_ops._per_direction(b_hh, num_dirs),
        _custom_ops._per_direction(w_hr, num_dirs), lengths, save=False, peephole=peephole)
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


# --- small helpers --------------------------------------------------------------------------------

def _checked_lengths(lengths, input: Tensor, batch_first: bool) -> Tensor:
    """The kernels trust lengths (params.h): [B] int64 on the input's device, each in [1, T].
    Returned as a private copy: torch.nn's packing keeps nothing of the caller's lengths, so an
    in-place update of them after the forward must not reach the saved one (it made the backward
    raise). The values are read here eagerly by the layer op's own check
    (_validation.check_lengths_values: on CUDA a sync, as torch.nn's packing makes; under vmap,
    all the vmapped lengths at once), except where they cannot be:
    - while a graph is recorded (torch.compile, torch.export, jit.trace) the layer op checks them
      each time it runs; under a torch.func transform no op runs (fusedrnn.reference's ops do),
      so the graph gets a device-side assert instead (found by review: a compiled torch.func.grad
      took lengths of 0 and 9 for T=6);
    - while a CUDA graph is captured, a device-side assert stops the launch, as the op's does;
    - meta and fake tensors hold none."""
    seq_len, batch = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
        if lengths.numel() == 0:  # (torch.as_tensor([]) is a float tensor)
            lengths = lengths.to(torch.int64)
    if (lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex()
            or lengths.dtype == torch.bool):
        raise ValueError(_validation.lengths_kind_text(batch, str(lengths.dtype),
                                                       str(tuple(lengths.shape))))
    if lengths.is_meta and not input.is_meta:
        raise ValueError(f"lengths is a meta tensor (no values) but input is on {input.device}: "
                         f"give the lengths on the CPU or on the input's device")
    recording = _backend.recording_graph()
    if batch > 0 and not _backend.without_data(lengths) and not (
            recording and not _backend.under_transform()):  # (there the op checks them)
        _validation.check_lengths_values(lengths, seq_len, on_device=recording)
    return lengths.to(device=input.device, dtype=torch.int64,
                      memory_format=torch.contiguous_format, copy=True)


def _longest_first(x: Tensor, lengths: Optional[Tensor]) -> Optional[Tensor]:
    """The batch order, longest sequence first, in which the CPU recurrence runs lengths that are
    not in that order already (a padded input with lengths; a PackedSequence's are): its steps
    compute rows [0, n) where n is the last row still running (recurrence_common.h, Steps), so
    a finished sequence among running ones is computed on to the end. None where nothing is
    reordered: no lengths, sorted ones, another backend, or a graph being recorded (the order
    would depend on the values). LSTM B=32 T=100 H=256 inference, lengths uniform in [10, 100],
    median of 30 calls on the busy 2-core Zen 4 VM: 44.0 ms before, 34.4 ms with this order, the
    gathers included (32.2 ms for lengths the caller sorted)."""
    if (lengths is None or x.shape[1] < 2 or x.device.type != "cpu"
            or _backend.backend_name() != "cpu" or not _backend.plain_eager()
            or bool((lengths[:-1] >= lengths[1:]).all())):
        return None
    return torch.argsort(lengths, descending=True, stable=True)


def _packs_eagerly(lengths: Tensor) -> bool:
    """Whether dropout between layers can be drawn on the packed rows (_packing.
    dropout_as_packed), which reads the lengths' values to shape the mask. Not while a graph is
    recorded or a torch.func transform runs (a shape that depends on values; Inductor's dropout
    draws from a stream of its own anyway), nor while a CUDA graph is captured (a device-to-host
    copy), nor for meta and fake lengths (no values): there the mask covers the padded output."""
    return (_backend.plain_eager() and not _backend.without_data(lengths)
            and not (lengths.is_cuda and torch.cuda.is_current_stream_capturing()))


def _require_rank(input, rank: int, layout: str) -> None:
    """A ValueError unless input is a tensor of `rank` dimensions (layout: what they are)."""
    if not isinstance(input, Tensor) or input.dim() != rank:
        got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"input must be a {rank}-D tensor {layout}, got {got}")


def _with_zero_biases(weights) -> list:
    """The weights with each missing bias a zero one, where any bias is given (None means no
    term, as in reference.rnn and torch.nn's cells). The layers run with biases when the first
    entry has a b_ih: a lone b_hh, or biases in a later entry only, were dropped silently
    (found by review, session 29)."""
    given = {b is not None for entry in weights for b in entry[2:4]}
    if given != {True, False}:
        return weights

    def bias(b, w_hh):
        return b if b is not None or not isinstance(w_hh, Tensor) else w_hh.new_zeros(w_hh.shape[:1])

    return [(w_ih, w_hh, bias(b_ih, w_hh), bias(b_hh, w_hh), *rest)
            for w_ih, w_hh, b_ih, b_hh, *rest in weights]


def _rows(state: Optional[Tensor], order: Tensor) -> Optional[Tensor]:
    """A [L*D, B, .] state's batch rows in `order`."""
    return state.index_select(1, order) if state is not None else None


def _compute_dtype(input: Tensor) -> torch.dtype:
    if (input.dtype in _UPCAST_ON_CPU and input.device.type == "cpu"
            and _backend.backend_name() == "cpu"):
        return torch.float32
    return input.dtype


def _cast(t, dtype):
    return t.to(dtype) if t is not None else None
