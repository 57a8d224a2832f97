"""ONNX export: a layer as torch's own RNN op, which the exporters translate to ONNX's LSTM, GRU
and RNN operators.

An ONNX model runs where fusedrnn does not (onnxruntime, TensorRT, a phone), so the custom op
fusedrnn::layer_forward, which only this process can run, must not reach the ONNX graph. While
`torch.onnx.export` traces (either exporter: `dynamo=True` or the TorchScript-based one), each
layer runs as `torch._VF.lstm` / `gru` / `rnn_tanh` / `rnn_relu` with num_layers=1, the calls
torch.nn's modules make: same gate order, same weights, same numbers, so the exported model is
the one torch.nn's twin would give (one ONNX RNN node per layer, as torch exports them). A module
fed a PackedSequence runs torch.nn's packed RNN op over all its layers instead (packed_rnn),
which the TorchScript-based exporter translates as it does torch.nn's.
What torch.nn cannot export fails the same way here: the TorchScript-based exporter refuses an
LSTM with proj_size, and the dynamo exporter of torch 2.13 writes one that onnxruntime rejects.
The exporters of torch 2.13 were checked (tests/test_onnx_export.py); an exporter that does not
set torch.onnx.is_in_onnx_export() would meet the custom op and fail to translate it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_TORCH_OPS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh,
              "rnn_relu": torch._VF.rnn_relu}


def refuse_peephole() -> None:
    """A peephole LSTM has no torch RNN op to export as (ONNX's LSTM node has peepholes, torch's
    ops do not): say so instead of writing a plain LSTM."""
    raise RuntimeError("fusedrnn: torch.onnx.export does not support peephole LSTMs yet (the "
                       "exporter writes torch's plain LSTM op); a coupled_input_forget LSTM "
                       "exports as the plain LSTM that computes it")


def as_exported(cell: str, layer_weights: list):
    """(cell, layer weights) as torch's RNN ops take them: a CIFG ("lstm_cifg": gates f, g, o) as
    the plain LSTM that computes it, whose input-gate rows are the forget gate's, negated
    (s(-a) = 1 - s(a) makes i = 1 - f exact, as csrc's cell_math.h has it). Others unchanged."""
    if cell != "lstm_cifg":
        return cell, layer_weights

    def with_input_gate(t, hidden):
        return torch.cat([-t[:hidden], t]) if t is not None else None

    plain = []
    for w_ih, w_hh, b_ih, b_hh, w_hr, *peephole in layer_weights:
        hidden = w_hh.size(0) // 3
        plain.append((with_input_gate(w_ih, hidden), with_input_gate(w_hh, hidden),
                      with_input_gate(b_ih, hidden), with_input_gate(b_hh, hidden), w_hr,
                      *(with_input_gate(w, 1) for w in peephole)))
    return "lstm", plain


def active() -> bool:
    """Whether torch.onnx.export is tracing the model (callers ask only while a graph is being
    recorded: torch.onnx's import is not free)."""
    return torch.onnx.is_in_onnx_export()


def layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor], c0: Optional[Tensor],
          lengths: Optional[Tensor]):
    """functional._layer under export: x [T, B, I] -> (out [T, B, D*P], h_n [D, B, P],
    c_n [D, B, H] or None), through torch's RNN op of the cell."""
    if lengths is not None:  # the modules export packed input by packed_rnn
        raise NotImplementedError(
            "fusedrnn.functional.rnn: ONNX export with per-sequence lengths is not supported; "
            "export a module (fusedrnn.LSTM/GRU/RNN) fed a PackedSequence, or a padded input")
    cell, layer_weights = as_exported(cell, layer_weights)
    num_dirs = len(layer_weights)
    w_hh, w_hr = layer_weights[0][1], layer_weights[0][4]
    state = w_hh.size(1)
    hidden = w_hr.size(1) if w_hr is not None else state
    has_bias = layer_weights[0][2] is not None
    flat = [w for direction in layer_weights for w in direction if w is not None]
    if h0 is None:
        h0 = x.new_zeros(num_dirs, x.size(1), state)
    if cell == "lstm" and c0 is None:
        c0 = x.new_zeros(num_dirs, x.size(1), hidden)
    result = _TORCH_OPS[cell](x, (h0, c0) if cell == "lstm" else h0, flat, has_bias, 1, 0.0,
                              False, num_dirs == 2, False)
    return result[0], result[1], (result[2] if cell == "lstm" else None)


def packed_rnn(cell: str, data: Tensor, batch_sizes: Tensor, hx, weights: list, has_bias: bool,
               num_layers: int, dropout: float, training: bool, bidirectional: bool,
               state: int, hidden: int):
    """A module's forward of a PackedSequence under export, as torch.nn runs it: its packed RNN
    op over the packed data (sorted batch order; hx None or in that order, as the module checked
    it), all layers at once. Returns (output data [N, D*P], h_n, c_n or None)."""
    num_states = num_layers * (2 if bidirectional else 1)
    if hx is None:
        max_batch = batch_sizes[0]
        h0 = torch.zeros(num_states, max_batch, state, dtype=data.dtype, device=data.device)
        hx = ((h0, torch.zeros(num_states, max_batch, hidden, dtype=data.dtype,
                               device=data.device)) if cell == "lstm" else h0)
    result = _TORCH_OPS[cell](data, batch_sizes, hx, weights, has_bias, num_layers, dropout,
                              training, bidirectional)
    return result[0], result[1], (result[2] if cell == "lstm" else None)
