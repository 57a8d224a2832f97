"""ONNX export: a layer as torch's own RNN op, which the exporters translate to ONNX's LSTM, GRU
and RNN operators.

An ONNX model runs where fusedrnn does not (onnxruntime, TensorRT, a phone), so the custom op
fusedrnn::layer_forward, which only this process can run, must not reach the ONNX graph. While
`torch.onnx.export` traces, each layer becomes ONNX's LSTM/GRU/RNN node:
- the TorchScript-based exporter: the layer runs as `torch._VF.lstm` / `gru` / `rnn_tanh` /
  `rnn_relu` with num_layers=1, the calls torch.nn's modules make (same gate order, same
  weights, same numbers), which the exporter translates as it does torch.nn's;
- the dynamo exporter (`dynamo=True`) with a dynamic length: the node is written directly
  (`torch.onnx.ops`, _onnx_node_layer) with outputs in x's symbolic length and batch, as
  torch's RNN ops keep the example's length in the program they record. The ONNXProgram's
  exported_program then holds the node, which computes nothing in torch (torch.onnx.verification
  reports a mismatch there); the ONNX model is right. With a fixed length, and where onnxruntime
  has no kernel for the node (float64, bfloat16) or the node cannot express the layer
  (proj_size), torch's op is recorded as for torch.nn, with the length fixed
  (_fix_sequence_length). A module
fed a PackedSequence runs torch.nn's packed RNN op over all its layers instead (packed_rnn),
which the TorchScript-based exporter translates as it does torch.nn's. The LSTM variants, which
torch.nn does not have: a CIFG is written as the plain LSTM that computes it (as_exported); a
peephole layer, for which torch has no op, as ONNX's LSTM node with its peephole input
(peephole_layer).
What torch.nn cannot export fails the same way here: the TorchScript-based exporter refuses an
LSTM with proj_size, and the dynamo exporter of torch 2.13 writes one that onnxruntime rejects.
The exporters of torch 2.13 were checked (tests/test_onnx_export.py); an exporter that does not
set torch.onnx.is_in_onnx_export() would meet the custom op and fail to translate it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

_TORCH_OPS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh,
              "rnn_relu": torch._VF.rnn_relu}


def refuse_peephole(why: str) -> None:
    """Where a peephole LSTM cannot be exported (see peephole_layer): say so instead of writing a
    plain LSTM."""
    raise RuntimeError(f"fusedrnn: torch.onnx.export of a peephole LSTM: {why}")


def refuse_packed_peephole() -> None:
    refuse_peephole("per-sequence lengths (a PackedSequence, or lengths=) are not supported by "
                    "the TorchScript-based exporter (torch's packed RNN op, which it translates, "
                    "has no peepholes); export with dynamo=True and lengths=, or a padded input")


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
    return torch.onnx.is_in_onnx_export() or _dynamo_exporter_flag()


def _dynamo_exporter_flag() -> bool:
    """The dynamo exporter's own flag, read directly. When torch.export's non-strict capture
    fails, the exporter retries with strict=True, where Dynamo folds torch.onnx.is_in_onnx_export()
    to False: the custom op was then recorded, and the export failed with "No ONNX function found
    for fusedrnn.layer_forward", hiding why the first capture failed. Dynamo reads a module
    global as the constant it is while it traces. (A private name of torch 2.13: absent in
    another torch, this says False, as before.)"""
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return bool(getattr(_flags, "_is_onnx_exporting", False))


def one_step_as_ops(x: Tensor, lengths: Optional[Tensor]) -> bool:
    """Whether the dynamo exporter records a layer of one fixed step (a cell; a decoder called
    step by step) as that step's torch ops (fusedrnn.reference), which export as elementwise ONNX
    ops, as torch.nn's cells do. torch's RNN op would go through torch.export's while_loop,
    whose traced state carries over between exports in one process: after some other exports,
    an LSTMCell's batch came out fixed to the example's, silently (Dim.AUTO)."""
    return (torch.compiler.is_compiling() and lengths is None
            and not isinstance(x.size(0), torch.SymInt) and x.size(0) == 1)


def layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor], c0: Optional[Tensor],
          lengths: Optional[Tensor]):
    """functional._layer under export: x [T, B, I] -> (out [T, B, D*P], h_n [D, B, P],
    c_n [D, B, H] or None), as ONNX's node (the dynamo exporter, a dynamic length: see the
    module's docstring) or through torch's RNN op of the cell."""
    cell, layer_weights = as_exported(cell, layer_weights)
    if lengths is not None:
        return _node_with_lengths(cell, x, layer_weights, h0, c0, lengths)
    if torch.compiler.is_compiling():  # the dynamo exporter
        if _writes_onnx_node(x, layer_weights) and isinstance(x.size(0), torch.SymInt):
            return _onnx_node_layer(cell, x, layer_weights, h0, c0)
        _fix_sequence_length(x)
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


def _node_with_lengths(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor],
                       c0: Optional[Tensor], lengths: Tensor, peephole: Optional[Tensor] = None):
    """A layer with per-sequence lengths under the dynamo exporter: ONNX's node with its
    sequence_lens input, which skips each sequence's padding as the kernels do (zero outputs
    past its end, its last valid state as Y_h). The TorchScript-based exporter gets a module's
    lengths as a PackedSequence (modules.py) and refuses them here, in a direct call of
    functional.rnn; and the node takes neither a projection nor float64/bfloat16."""
    if not torch.compiler.is_compiling():
        raise NotImplementedError(
            "fusedrnn.functional.rnn: the TorchScript-based ONNX exporter takes per-sequence "
            "lengths from a module (fusedrnn.LSTM/GRU/RNN with lengths=, or fed a "
            "PackedSequence), not from functional.rnn; or export with dynamo=True")
    if layer_weights[0][4] is not None:
        raise NotImplementedError(
            "fusedrnn: ONNX export of an LSTM with proj_size and per-sequence lengths is not "
            "supported: ONNX's LSTM node, the one with sequence_lens, has no projection (nor "
            "does the TorchScript-based exporter take torch.nn's projected LSTM)")
    if not _writes_onnx_node(x, layer_weights):
        raise NotImplementedError(
            f"fusedrnn: ONNX export with per-sequence lengths writes ONNX's {_ONNX_NODES[cell]} "
            f"node with sequence_lens, which onnxruntime runs in float32 or float16, not "
            f"{x.dtype}: export the model in float32")
    return _onnx_node_layer(cell, x, layer_weights, h0, c0, peephole,
                            sequence_lens=lengths.to(torch.int32))


def _onnx_gate_order(cell: str, t: Tensor, hidden: int) -> Tensor:
    """Rows of a torch weight or bias in ONNX's gate order: LSTM i, f, g, o -> i, o, f, c;
    GRU r, z, n -> z, r, h; an Elman RNN's one block unchanged."""
    if cell == "lstm":
        return torch.cat([t[:hidden], t[3 * hidden:], t[hidden:3 * hidden]])
    if cell == "gru":
        return torch.cat([t[hidden:2 * hidden], t[:hidden], t[2 * hidden:]])
    return t


def _onnx_operands(cell: str, layer_weights) -> tuple:
    """ONNX's W [D, G*H, I], R [D, G*H, H] and B [D, 2*G*H] (None without a bias) of a layer's
    torch weights, stacked over its directions."""
    hidden = layer_weights[0][1].size(1)

    def stacked(index):
        return torch.stack([_onnx_gate_order(cell, w[index], hidden) for w in layer_weights])

    bias = None
    if layer_weights[0][2] is not None:
        bias = torch.stack([torch.cat([_onnx_gate_order(cell, w[2], hidden),
                                       _onnx_gate_order(cell, w[3], hidden)])
                            for w in layer_weights])
    return stacked(0), stacked(1), bias


_ONNX_NODES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
# Where the dynamo exporter gets ONNX's node from us (given a dynamic length): the dtypes
# onnxruntime runs it in (1.32 has no double kernel for these nodes, and they take no bfloat16),
# and no projection (ONNX's LSTM has none). Elsewhere torch's RNN op is recorded, as torch.nn's
# module records it.
_ONNX_NODE_DTYPES = (torch.float32, torch.float16)


def _writes_onnx_node(x: Tensor, layer_weights) -> bool:
    return x.dtype in _ONNX_NODE_DTYPES and layer_weights[0][4] is None


def _onnx_node_layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor],
                     c0: Optional[Tensor], peephole: Optional[Tensor] = None,
                     sequence_lens: Optional[Tensor] = None):
    """The dynamo exporter: the layer as ONNX's LSTM/GRU/RNN node, written directly
    (torch.onnx.ops), its output shapes in x's symbolic T and B, so a model exported with a
    dynamic length runs at any length. sequence_lens: [B] int32, or None for all of T."""
    num_dirs, hidden = len(layer_weights), layer_weights[0][1].size(1)
    seq_len, batch = x.size(0), x.size(1)
    onnx_w, onnx_r, onnx_b = _onnx_operands(cell, layer_weights)
    attributes = {"hidden_size": hidden,
                  "direction": "bidirectional" if num_dirs == 2 else "forward"}
    inputs = [x, onnx_w, onnx_r, onnx_b, sequence_lens, h0]
    if cell == "lstm":
        inputs += [c0, peephole]
    elif cell == "gru":
        attributes["linear_before_reset"] = 1  # torch's n = tanh(W_in x + r * (W_hn h + b_hn))
    else:
        attributes["activations"] = ["Relu" if cell == "rnn_relu" else "Tanh"] * num_dirs
    state_shape = [num_dirs, batch, hidden]
    shapes = [[seq_len, num_dirs, batch, hidden], state_shape] + (
        [state_shape] if cell == "lstm" else [])
    outputs = torch.onnx.ops.symbolic_multi_out(
        _ONNX_NODES[cell], inputs, attributes, dtypes=[x.dtype] * len(shapes), shapes=shapes)
    # Y [T, D, B, H] -> torch's [T, B, D*H]
    out = outputs[0].permute(0, 2, 1, 3).reshape(seq_len, batch, num_dirs * hidden)
    return out, outputs[1], (outputs[2] if cell == "lstm" else None)


def _fix_sequence_length(x: Tensor) -> None:
    """The dynamo exporter where it records torch's RNN op (no ONNX node written): that op
    keeps the example's sequence length in the program it records (its output's shape) while
    x's stays symbolic, so an exported model that declared T dynamic failed in onnxruntime at any
    other length, or returned a tensor of the wrong shape with no error. Reading T as an int
    fixes it to the example's: the model then declares T fixed and onnxruntime refuses other
    lengths."""
    int(x.size(0))


def peephole_layer(cell: str, x: Tensor, layer_weights, h0: Optional[Tensor],
                   c0: Optional[Tensor], lengths: Optional[Tensor]):
    """functional._layer of a peephole LSTM under export, as `layer`: torch has no peephole RNN
    op, but ONNX's LSTM node has a peephole input (P), which the TorchScript-based exporter
    writes from _PeepholeLstmNode's symbolic and the dynamo exporter from _onnx_node_layer.
    Refused: a projection (ONNX's LSTM has none), lengths under the TorchScript-based exporter
    (a PackedSequence: torch's packed op has no peepholes either; the dynamo exporter gives them
    to the node as sequence_lens), and under the dynamo exporter a dtype onnxruntime cannot run
    the node in (there is no torch op to fall back on)."""
    if lengths is not None and not torch.compiler.is_compiling():
        refuse_packed_peephole()
    if layer_weights[0][4] is not None:
        refuse_peephole("proj_size is not supported (ONNX's LSTM node has no projection)")
    _, layer_weights = as_exported(cell, layer_weights)  # a CIFG as the plain LSTM
    num_dirs, batch = len(layer_weights), x.size(1)
    hidden = layer_weights[0][1].size(1)
    onnx_p = torch.stack([w[5][[0, 2, 1]].reshape(-1) for w in layer_weights])  # i, o, f
    if lengths is not None:
        return _node_with_lengths("lstm", x, layer_weights, h0, c0, lengths, onnx_p)
    if torch.compiler.is_compiling():  # the dynamo exporter
        if not _writes_onnx_node(x, layer_weights):
            refuse_peephole(f"ONNX's LSTM node, the only one with peepholes, takes float32 or "
                            f"float16 here, not {x.dtype}")
        return _onnx_node_layer("lstm", x, layer_weights, h0, c0, onnx_p)
    onnx_w, onnx_r, onnx_b = _onnx_operands("lstm", layer_weights)
    if onnx_b is None:
        onnx_b = x.new_zeros(num_dirs, 8 * hidden)
    if h0 is None:
        h0 = x.new_zeros(num_dirs, batch, hidden)
    if c0 is None:
        c0 = x.new_zeros(num_dirs, batch, hidden)
    flat = [t for w in layer_weights for t in (w[0], w[1], w[2], w[3], w[5])]
    return _PeepholeLstmNode.apply(x, h0, c0, onnx_w, onnx_r, onnx_b, onnx_p, *flat)


class _PeepholeLstmNode(torch.autograd.Function):
    """A peephole LSTM layer (padded, no projection) while the TorchScript-based exporter traces:
    the values from fusedrnn.reference (the formulas stay there), the graph node ONNX's LSTM
    with its P input. Inputs: x [T, B, I], h0 and c0 [D, B, H], the ONNX operands W, R, B, P
    ([D, 4H, I], [D, 4H, H], [D, 8H], [D, 3H]), then per direction torch's
    (w_ih, w_hh, b_ih, b_hh, peephole)."""

    @staticmethod
    def forward(ctx, x, h0, c0, onnx_w, onnx_r, onnx_b, onnx_p, *flat):
        weights = [(*flat[i:i + 4], None, flat[i + 4]) for i in range(0, len(flat), 5)]
        out, h_n, c_n = reference.rnn("lstm", x, weights, (h0, c0),
                                      bidirectional=len(weights) == 2)
        return out, h_n, c_n

    @staticmethod
    def symbolic(g, x, h0, c0, onnx_w, onnx_r, onnx_b, onnx_p, *flat):
        hidden = onnx_r.type().sizes()[2]  # (the weights' sizes are static)
        no_lengths = g.op("prim::Constant")  # an absent optional input, as torch's RNNs write it
        no_lengths.setType(torch._C.OptionalType.ofTensor())
        bidirectional = len(flat) == 10
        y, y_h, y_c = g.op("LSTM", x, onnx_w, onnx_r, onnx_b, no_lengths, h0, c0, onnx_p,
                           hidden_size_i=hidden,
                           direction_s="bidirectional" if bidirectional else "forward",
                           outputs=3)
        # Y [T, D, B, H] -> torch's [T, B, D*H]
        y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
        y = g.op("Reshape", y, g.op("Constant", value_t=torch.tensor([0, 0, -1])))
        return y, y_h, y_c


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
