"""Plain-PyTorch LSTM, GRU and Elman RNN: the oracle every fusedrnn kernel is tested against.

Written as a step loop that reads like the textbook equations (and like torch.nn's docs), with no
native code and no cleverness, so that a reader can check it line by line. It is differentiable
through autograd, which gives the reference gradients. Tests pin it to torch.nn (same weights, same
outputs and gradients in float64).

Gate order is torch's: LSTM i, f, g, o; GRU r, z, n.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._packing import dropout_as_packed


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor] = None,
              peephole: Optional[Tensor] = None, coupled_input_forget: bool = False):
    """One LSTM step. x [B, I], h [B, P], c [B, H] -> (h' [B, P], c' [B, H]).

    peephole [3, H]: the diagonal peephole weights (w_ci, w_cf, w_co) of Gers, Schraudolph and
    Schmidhuber (2002): the input and forget gates also see c, the output gate sees c'.
    coupled_input_forget: the coupled input and forget gate (CIFG) of Greff et al. (2017), an LSTM
    without an input gate of its own: i = 1 - f. The weights then hold the gates f, g, o
    ([3H, .] and [3H]) and the peephole weights w_cf, w_co ([2, H])."""
    if peephole is not None and peephole.shape != (2 if coupled_input_forget else 3, c.shape[1]):
        raise ValueError(f"peephole must be [{2 if coupled_input_forget else 3}, H] = "
                         f"{[2 if coupled_input_forget else 3, c.shape[1]]} (rows w_ci, w_cf, "
                         f"w_co; a CIFG has no w_ci), got {list(peephole.shape)}")
    gates = _affine(x, w_ih, b_ih) + _affine(h, w_hh, b_hh)
    if coupled_input_forget:
        f, g, o = gates.chunk(3, dim=1)
        if peephole is not None:
            f = f + peephole[0] * c
        f, g = torch.sigmoid(f), torch.tanh(g)
        i = 1 - f
    else:
        i, f, g, o = gates.chunk(4, dim=1)
        if peephole is not None:
            i = i + peephole[0] * c
            f = f + peephole[1] * c
        i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
    c_next = f * c + i * g
    if peephole is not None:
        o = o + peephole[-1] * c_next
    o = torch.sigmoid(o)
    h_next = o * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.t()
    return h_next, c_next


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    """One GRU step. x [B, I], h [B, H] -> h' [B, H]."""
    x_r, x_z, x_n = _affine(x, w_ih, b_ih).chunk(3, dim=1)
    h_r, h_z, h_n = _affine(h, w_hh, b_hh).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
             b_hh: Optional[Tensor], nonlinearity: str = "tanh") -> Tensor:
    """One Elman RNN step. x [B, I], h [B, H] -> h' [B, H]."""
    pre = _affine(x, w_ih, b_ih) + _affine(h, w_hh, b_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def rnn_layer(cell: str, x: Tensor, w_ih: Optional[Tensor], w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], w_hr: Optional[Tensor], h0: Optional[Tensor],
              c0: Optional[Tensor], lengths: Optional[Tensor] = None, reverse: bool = False,
              peephole: Optional[Tensor] = None, coupled_input_forget: bool = False):
    """One layer, one direction over a padded time-major sequence.

    cell: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'. x [T, B, I], or with w_ih=None the input
    projection x W_ih^T + b_ih [T, B, G*H] that the native layers receive; h0 [B, P] and
    c0 [B, H] (LSTM) default to zeros. lengths [B] (int, each in [1, T]) marks sequence b valid
    at t < lengths[b]: past it the state of b stays unchanged and its output is zero; the reverse
    direction starts at each sequence's last valid step. peephole, coupled_input_forget: the LSTM
    variants of lstm_cell. Returns (out [T, B, P], h_n [B, P], c_n [B, H] or None).
    """
    seq_len, batch = x.shape[0], x.shape[1]
    gate_count = 3 if coupled_input_forget else {"lstm": 4, "gru": 3}.get(cell, 1)
    hidden = w_hh.shape[0] // gate_count
    state = w_hh.shape[1]
    h = h0 if h0 is not None else x.new_zeros(batch, state)
    c = None
    if cell == "lstm":
        c = c0 if c0 is not None else x.new_zeros(batch, hidden)
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    outputs: list[Optional[Tensor]] = [None] * seq_len
    for t in steps:
        if cell == "lstm":
            h_next, c_next = lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, peephole,
                                       coupled_input_forget)
        elif cell == "gru":
            h_next, c_next = gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh), None
        else:
            nonlinearity = "tanh" if cell == "rnn_tanh" else "relu"
            h_next, c_next = rnn_cell(x[t], h, w_ih, w_hh, b_ih, b_hh, nonlinearity), None
        if lengths is None:
            h, c = h_next, c_next
            outputs[t] = h
        else:
            # Padded steps keep the state and emit zeros. Because the state is unchanged until a
            # sequence's first valid step, the reverse direction starts from h0 at lengths[b]-1.
            valid = (t < lengths).to(x.device).unsqueeze(1)
            h = torch.where(valid, h_next, h)
            if c is not None:
                c = torch.where(valid, c_next, c)
            outputs[t] = torch.where(valid, h_next, torch.zeros_like(h_next))
    return torch.stack(outputs), h, c


def _affine(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """x W^T + b; without W, x is taken as already projected (rnn_layer's w_ih=None)."""
    y = x @ weight.t() if weight is not None else x
    return y + bias if bias is not None else y


# --- the whole multi-layer network --------------------------------------------------------------

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

# Per layer and direction, in torch's all_weights order (layer-major, forward before reverse):
# (w_ih, w_hh, b_ih, b_hh, w_hr); the biases are None with bias=False, w_hr None without proj_size.
# A peephole LSTM adds a sixth entry, its peephole weights (lstm_cell).
LayerWeights = tuple


def rnn(cell: str, input: Tensor, weights, hx=None, *, num_layers: int = 1,
        bidirectional: bool = False, batch_first: bool = False, lengths: Optional[Tensor] = None,
        dropout: float = 0.0, training: bool = False, dropout_fn=None,
        coupled_input_forget: bool = False):
    """A stacked, optionally bidirectional RNN over a padded sequence, like torch.nn.LSTM/GRU/RNN.

    cell: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'. input [T, B, I] ([B, T, I] with batch_first).
    weights: num_layers * num_directions LayerWeights (see above; `weights_of(module)` builds it).
    hx: h_0 [L*D, B, P], or for LSTM a pair (h_0, c_0 [L*D, B, H]); None means zeros.
    lengths: [B] valid lengths (what a PackedSequence stands for): see `rnn_layer`.
    Between layers, in training mode, the output of every layer but the last goes through
    `dropout_fn(output)` (time-major [T, B, D*P]); by default F.dropout(output, dropout), which
    draws the same mask as torch.nn for the same RNG state, and with lengths the mask torch.nn
    draws on the packed rows behind pack_padded_sequence (_packing.dropout_as_packed).
    coupled_input_forget: a CIFG LSTM (lstm_cell).

    Returns (output [T, B, D*P] or [B, T, D*P], h_n [L*D, B, P], c_n [L*D, B, H] or None).
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    num_directions = 2 if bidirectional else 1
    if len(weights) != num_layers * num_directions:
        raise ValueError(f"expected {num_layers * num_directions} layer weights, got {len(weights)}")
    x = input.transpose(0, 1) if batch_first else input
    h0_all, c0_all = (hx if cell == "lstm" else (hx, None)) if hx is not None else (None, None)
    if dropout_fn is None:
        def dropout_fn(output):
            if lengths is not None:
                return dropout_as_packed(output, lengths, dropout)
            return torch.nn.functional.dropout(output, dropout, training=True)
    apply_dropout = training and dropout > 0

    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr, *peephole = weights[index]
            h0 = h0_all[index] if h0_all is not None else None
            c0 = c0_all[index] if c0_all is not None else None
            out, h, c = rnn_layer(cell, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths,
                                  reverse=direction == 1,
                                  peephole=peephole[0] if peephole else None,
                                  coupled_input_forget=coupled_input_forget)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outputs, dim=2)
        if apply_dropout and layer < num_layers - 1:
            x = dropout_fn(x)
    output = x.transpose(0, 1) if batch_first else x
    return output, torch.stack(h_n), torch.stack(c_n) if cell == "lstm" else None


def lstm(input: Tensor, weights, hx=None, **options):
    """torch.nn.LSTM's forward as a function: (output, (h_n, c_n)). Options as in `rnn`."""
    output, h_n, c_n = rnn("lstm", input, weights, hx, **options)
    return output, (h_n, c_n)


def gru(input: Tensor, weights, hx=None, **options):
    """torch.nn.GRU's forward as a function: (output, h_n). Options as in `rnn`."""
    output, h_n, _ = rnn("gru", input, weights, hx, **options)
    return output, h_n


def rnn_tanh(input: Tensor, weights, hx=None, **options):
    """torch.nn.RNN(nonlinearity='tanh')'s forward as a function: (output, h_n)."""
    output, h_n, _ = rnn("rnn_tanh", input, weights, hx, **options)
    return output, h_n


def rnn_relu(input: Tensor, weights, hx=None, **options):
    """torch.nn.RNN(nonlinearity='relu')'s forward as a function: (output, h_n)."""
    output, h_n, _ = rnn("rnn_relu", input, weights, hx, **options)
    return output, h_n


def cell_of(module) -> str:
    """The cell name of a torch.nn or fusedrnn RNN module: 'lstm', 'gru', 'rnn_tanh', 'rnn_relu'."""
    mode = getattr(module, "mode", None)
    if mode is not None:
        return mode.lower()
    name = type(module).__name__.lower()
    if name.startswith("lstm"):
        return "lstm"
    if name.startswith("gru"):
        return "gru"
    return "rnn_relu" if getattr(module, "nonlinearity", "tanh") == "relu" else "rnn_tanh"


def weights_of(module) -> list:
    """The LayerWeights of a torch.nn or fusedrnn LSTM/GRU/RNN module, in the order `rnn` expects
    (a fusedrnn LSTM's variants as it holds them: pass its coupled_input_forget to `rnn`)."""
    num_directions = 2 if module.bidirectional else 1
    weights = []
    for layer in range(module.num_layers):
        for direction in range(num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            entry = tuple(getattr(module, name + suffix, None) for name in
                          ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
            peephole = getattr(module, "weight_peephole" + suffix, None)
            weights.append(entry + (peephole,) if peephole is not None else entry)
    return weights
