"""The custom ops (torch.library) `fusedrnn::layer_forward` and `fusedrnn::layer_backward`:
what torch.compile traces.

A native call takes data pointers, which torch.compile cannot trace; as custom ops with fake
kernels (shapes only) and a registered backward formula, a whole LSTM/GRU/RNN compiles with
fullgraph=True, forward and backward. The schema has no None outputs and no dataclasses: the
layer's spec travels as cell, the lists (D directions) and save; an output the cell or mode has
no use for (cn of GRU/RNN, gates/c_seq/r_seq without save, d_hproj/d_h_seq/d_c0 of cells
without them) is an empty tensor, and so is each entry of b_hh, w_hr or peephole where the
layer has no bias, projection or peepholes (`as_op_list`; no such weight is empty). The ops
also take an empty list there, but the modules never pass one: AOTInductor's proxy executor
hands an op an empty Tensor[] argument as None, which the schema refuses, so a compiled package
failed at every call (and a Tensor?[] of Nones meets other gaps in torch.compile).
The ops run the native recurrence of _layer_recurrence.py, as the eager autograd.Function does.
Importing this file registers them (fusedrnn/__init__ imports functional, which imports it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# The recurrence's functions through their module, so that what replaces one there (a test's
# monkeypatch of _run_forward, say) replaces it here too.
from . import _backend, _layer_recurrence, _saved_layout, _validation
from ._backend import LSTM_CELLS, SAVED_GATE_COUNT
from ._layer_recurrence import _contiguous, _last_dim_contiguous


def _none_as_empty(tensors, like: Tensor) -> tuple:
    return tuple(t if t is not None else like.new_empty(0) for t in tensors)


def _per_direction(tensors, num_dirs: int):
    """An op's list argument (present_in'd: empty where absent) as D tensors or D Nones."""
    return tuple(tensors) if tensors else (None,) * num_dirs


def as_op_list(tensors, num_dirs: int, like: Tensor) -> list:
    """An optional per-direction list (b_hh, w_hr, peephole; empty where absent) as the modules
    pass it to the ops: D tensors, or D empty tensors."""
    return list(tensors) if tensors else [like.new_empty(0)] * num_dirs


def present_in(tensors) -> list:
    """An op's optional list argument as the recurrence takes it: the tensors, empty where
    absent (D empty tensors, or an empty list)."""
    return [t for t in tensors if t.numel() != 0]


@torch.library.custom_op("fusedrnn::layer_forward", mutates_args=())
def layer_forward(cell: str, xproj: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                  w_hh: list[Tensor], b_hh: list[Tensor], w_hr: list[Tensor],
                  peephole: list[Tensor], lengths: Optional[Tensor], save: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The recurrence of all D directions of a layer: xproj [T, B, D*G*H] = x W_ih^T (+ b_ih),
    w_hh/b_hh/w_hr/peephole lists of D tensors (b_hh, w_hr, peephole D empty tensors, or
    empty, when absent; peephole [3, H], a CIFG's [2, H], LSTMs only), h0 [D, B, P],
    c0 [D, B, H], lengths [B] int64. Returns (out [T, B, D*P], hn [D, B, P], cn [D, B, H],
    then with save what backward reads: gates [D, T, B, S*H], c_seq and r_seq [D, T, B, H],
    zero at padded steps); empty where absent. Bad arguments raise
    (_validation.check_layer_forward) before any native call: the kernels trust every size."""
    b_hh, w_hr, peephole = present_in(b_hh), present_in(w_hr), present_in(peephole)
    _validation.check_layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths,
                                    lengths is not None and not _native_checks_lengths(xproj),
                                    peephole=peephole)
    num_dirs = len(w_hh)
    c0 = c0 if cell in LSTM_CELLS else None  # another cell's c0 can only be an empty placeholder
    results = _layer_recurrence._run_forward(
        cell, _last_dim_contiguous(xproj), _contiguous(h0), _contiguous(c0), w_hh,
        _per_direction(b_hh, num_dirs), _per_direction(w_hr, num_dirs), _contiguous(lengths), save,
        zero_padding=True, peephole=peephole)
    return _none_as_empty(results, xproj)


@layer_forward.register_fake
def _layer_forward_fake(cell, xproj, h0, c0, w_hh, b_hh, w_hr, peephole, lengths, save):
    b_hh, w_hr, peephole = present_in(b_hh), present_in(w_hr), present_in(peephole)
    _validation.check_layer_forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, lengths, False,
                                    peephole=peephole)
    return _none_as_empty(
        _layer_recurrence._forward_outputs(cell, xproj, len(w_hh), w_hh[0].shape[1], bool(w_hr),
                                           lengths, save, zero_padding=True),
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
    b_hh, w_hr, peephole = present_in(b_hh), present_in(w_hr), present_in(peephole)
    _validation.check_layer_backward(cell, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out,
                                     d_hn, d_cn, lengths,
                                     lengths is not None and not _native_checks_lengths(out),
                                     peephole=peephole)
    num_dirs = len(w_hh)
    if cell not in LSTM_CELLS:  # what another cell has no use for can only be an empty placeholder
        c0 = c_seq = d_cn = None
    if not SAVED_GATE_COUNT[cell]:
        gates = None
    grads = _layer_recurrence._run_backward(
        cell, w_hh, _per_direction(b_hh, num_dirs), _per_direction(w_hr, num_dirs),
        _contiguous(h0), _contiguous(c0), _last_dim_contiguous(out), _contiguous(gates),
        _contiguous(c_seq), d_out, d_hn, d_cn, _contiguous(lengths), peephole)
    return _none_as_empty(grads, out)


@layer_backward.register_fake
def _layer_backward_fake(cell, w_hh, b_hh, w_hr, peephole, h0, c0, out, gates, c_seq, d_out,
                         d_hn, d_cn, lengths):
    b_hh, w_hr, peephole = present_in(b_hh), present_in(w_hr), present_in(peephole)
    _validation.check_layer_backward(cell, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out,
                                     d_hn, d_cn, lengths, False, peephole=peephole)
    return _none_as_empty(
        _layer_recurrence._backward_outputs(cell, out, len(w_hh), w_hh[0].shape[0],
                                            w_hh[0].shape[1], bool(w_hr)),
        out)


def _run_backward_op(cell: str, w_hh, b_hh, w_hr, h0, c0, out, gates, c_seq, d_out, d_hn, d_cn,
                     lengths, peephole=()):
    """_run_backward through the layer_backward op (what the compiled backward graph holds)."""
    has_proj = w_hr[0] is not None

    def op_list(tensors):
        return as_op_list([t for t in tensors if t is not None], len(w_hh), out)

    d_xproj, d_hproj, d_h_seq, d_h0, d_c0 = layer_backward(
        cell, list(w_hh), op_list(b_hh), op_list(w_hr), op_list(peephole), h0, c0, out, gates,
        c_seq, d_out, d_hn, d_cn, lengths)
    return (d_xproj, d_hproj if cell == "gru" else None, d_h_seq if has_proj else None, d_h0,
            d_c0 if cell in LSTM_CELLS else None)


def _layer_forward_setup_context(ctx, inputs, output):
    cell, xproj, h0, c0, w_hh, *optional_lists, lengths, save = inputs
    # Which entries of b_hh, w_hr and peephole are weights (not placeholders): their gradients
    # go there.
    ctx.present = [[t.numel() != 0 for t in ts] for ts in optional_lists]
    b_hh, w_hr, peephole = (present_in(ts) for ts in optional_lists)
    out, hn, cn, gates, c_seq, r_seq = output
    spec = _layer_recurrence._LayerSpec(cell, len(w_hh), bool(b_hh), bool(w_hr), bool(peephole))
    ctx.mark_non_differentiable(*output[2 if cell not in LSTM_CELLS else 3:])
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.saved = spec, save
    if save:  # what _forward_outputs allocated, Nones for the empty placeholders
        gates = gates if SAVED_GATE_COUNT[cell] else None
        c_seq = c_seq if cell in LSTM_CELLS else None
        r_seq = r_seq if spec.has_proj else None
        _saved_layout.save_for_backward(
            ctx, lengths, h0, c0, out, gates, c_seq, r_seq,
            *_layer_recurrence._unsaved_biases(spec, (*w_hh, *b_hh, *w_hr, *peephole)))


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
    needs_present = [need for i in (5, 6, 7)
                     for need, present in zip(needs[i], ctx.present[i - 5]) if present]
    saved = _saved_layout.saved_tensors(ctx, "fusedrnn::layer_forward")
    grads = _layer_recurrence._layer_grads(spec, saved, d_out, d_hn,
                                           d_cn if spec.cell in LSTM_CELLS else None,
                                           [*needs[4], *needs_present], _run_backward_op)
    d_xproj, d_h0, d_c0, *d_params = grads
    d_w_hh, *d_optional = spec.split(d_params)  # D gradients each, Nones where absent
    # A gradient list as long as its input list: the weights' gradients, None for a placeholder.
    d_lists = [[d if present else None for d, present in zip(grads, mask)]
               for grads, mask in zip(d_optional, ctx.present)]
    return (None, d_xproj, d_h0, d_c0, list(d_w_hh), *d_lists, None, None)


def _layer_backward_backward(ctx, *_):
    raise RuntimeError(_layer_recurrence._DOUBLE_BACKWARD_ERROR)


torch.library.register_autograd("fusedrnn::layer_forward", _layer_forward_backward,
                                setup_context=_layer_forward_setup_context)
# The native backward is not differentiable: say so, as _layer_recurrence._NoDoubleBackward does
# eagerly.
torch.library.register_autograd("fusedrnn::layer_backward", _layer_backward_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _native_checks_lengths(like: Tensor) -> bool:
    """Whether the native module checks lengths' values itself: the CPU module does (before
    reading any step; ValueError naming lengths[b]); the CUDA kernels and their emulation do not
    (on a GPU that would need a sync), so for them Python does (_validation.check_op_lengths)."""
    return not like.is_cuda and _backend.backend_name() == "cpu"
