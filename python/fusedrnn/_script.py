"""What `torch.jit.script` compiles for fusedrnn's modules and cells.

torch.nn's RNNs and cells are scriptable, so fusedrnn's are too. The eager path (fast paths,
inference plans, autocast, Python-side checks) is not TorchScript, so a scripted module's forward
takes this one instead: the layer loop of `functional._rnn`, in TorchScript's subset, with each
layer's recurrence the custom op `fusedrnn::layer_forward` (_custom_ops.py). That op runs the same
native forward as eager, and its registered backward formula the same native backward, so a
scripted model runs on fusedrnn's kernels and trains. The op is registered by `import fusedrnn`:
a saved script loads and runs in a process that imported fusedrnn (as a saved trace does).

What this path leaves out, against eager: the fast paths for B=1 and one-step calls (it always
runs the recurrence op), autocast (a script runs in the input's dtype; torch.nn's scripted GRU
does too, its LSTM and cells return the autocast dtype), and the exception classes: TorchScript
raises torch.jit.Error, whose message ends with the original class and text (torch.nn's scripted
modules behave the same; its scripted cells raise a state's size and dtype errors from inside an
op, as RuntimeError).

Every function here takes the flat weight list of torch.nn's `_flat_weights` order: per layer
and direction w_ih, w_hh, then b_ih, b_hh with bias, then w_hr with a projection.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _packing, _validation
from .functional import folds_bias


def check_input(input: Tensor, weight: Tensor, input_size: int, expected_dim: int) -> None:
    """torch.nn.RNNBase.check_input's checks, as the eager path makes them (_validation). (A
    script cannot format a dtype, so the dtype message names none; it keeps torch.nn's words.)"""
    if input.dtype != weight.dtype:
        raise ValueError("RNN input dtype (the input's) does not match weight dtype (the "
                         "model's). Convert input: input.to(<the weights' dtype>), or convert "
                         "model: model.to(<the input's dtype>)")
    if input.dim() != expected_dim:
        raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
    if input.size(-1) != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, "
                           f"got {input.size(-1)}")
    if input.device != weight.device:
        raise RuntimeError(f"Input and parameter tensors are not at the same device, found input "
                           f"tensor at {input.device} and parameter tensor at {weight.device}")


def _module_name(mode: str) -> str:
    return "RNN" if mode.startswith("RNN") else mode


def check_no_lengths(lengths: Optional[Tensor], mode: str) -> None:
    """_validation.check_lengths_input's PackedSequence case."""
    if lengths is not None:
        raise ValueError(_validation.lengths_with_packed_text(_module_name(mode)))


def refuse_unbatched_lengths(input: Tensor, mode: str) -> None:
    """_validation.check_lengths_input's unbatched case."""
    raise ValueError(_validation.lengths_unbatched_text(_module_name(mode),
                                                        shape_text(input.shape)))


def checked_lengths(lengths: Tensor, x: Tensor) -> Tensor:
    """functional._checked_lengths for a time-major x [T, B, I]: [B] integers in [1, T], returned
    as a private int64 copy on x's device."""
    batch, seq_len = x.size(1), x.size(0)
    if (lengths.dim() != 1 or lengths.size(0) != batch or lengths.is_floating_point()
            or lengths.is_complex() or lengths.dtype == torch.bool):
        # (A script prints a dtype as its number: the kind instead.)
        kind = "a floating-point or complex tensor" if lengths.is_floating_point() \
            or lengths.is_complex() else ("a bool tensor" if lengths.dtype == torch.bool
                                          else "an integer tensor")
        raise ValueError(_validation.lengths_kind_text(batch, kind, shape_text(lengths.shape)))
    if batch > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > seq_len:
            raise ValueError(f"{_validation.lengths_range_text(seq_len)}, got values from "
                             f"{low} to {high}")
    return lengths.to(device=x.device, dtype=torch.int64, copy=True).contiguous()


def check_state_dtype_and_device(state: Tensor, input: Tensor, name: str) -> None:
    if state.device != input.device:
        raise RuntimeError(f"Input and hidden tensors are not at the same device, found input "
                           f"tensor at {input.device} and {name} tensor at {state.device}")
    if state.dtype != input.dtype:
        raise RuntimeError(f"Expected {name} to have the input's dtype")


def check_module_state_dims(h0: Optional[Tensor], c0: Optional[Tensor], batched: bool) -> None:
    """A module's states are 3-D for a batched input, 2-D for an unbatched one (RuntimeError,
    torch.nn's text, which checks an LSTM's two together)."""
    expected = 3 if batched else 2
    kind = "batched 3-D" if batched else "unbatched 2-D"
    if h0 is not None and c0 is not None:
        if h0.dim() != expected or c0.dim() != expected:
            raise RuntimeError(f"For {kind} input, hx and cx should also be {expected}-D but got "
                               f"({h0.dim()}-D, {c0.dim()}-D) tensors")
    for state in [h0, c0]:
        if state is not None and state.dim() != expected:
            raise RuntimeError(f"For {kind} input, hx should also be {expected}-D but got "
                               f"{state.dim()}-D tensor")


def shape_text(shape: List[int]) -> str:
    """A shape as torch.nn's messages print an expected one, a Python tuple: "(1, 2, 20)" (a
    script's List[int] would print as a list)."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join([str(size) for size in shape]) + ")"


def module_state(state: Optional[Tensor], expected: List[int], batched: bool, name: str,
                 torch_name: str) -> Optional[Tensor]:
    """One initial state of a module (None stays None; its rank is checked already,
    check_module_state_dims): given a batch dimension when the input has none, then its shape
    checked against `expected`, the [L*D, B, size] shape for the time-major input (its dtype
    and device after every state's shape: check_state_dtype_and_device). torch_name: what
    torch.nn's message calls it (hidden, hidden[0], hidden[1])."""
    if state is None:
        return None
    state = state if batched else state.unsqueeze(1)
    if state.shape != expected:
        raise RuntimeError(f"Expected {torch_name} size {shape_text(expected)}, got "
                           f"{list(state.shape)} ({name})")
    return state


def _layer_tensors(weights: List[Tensor], first: int, num_dirs: int, has_bias: bool,
                   has_proj: bool) -> Tuple[List[Tensor], List[Tensor], List[Tensor],
                                            List[Tensor], List[Tensor]]:
    """(w_ih, w_hh, b_ih, b_hh, w_hr) lists of one layer's directions (empty where absent);
    `first` is the flat index of the layer's first tensor."""
    per_direction = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    w_ih: List[Tensor] = []
    w_hh: List[Tensor] = []
    b_ih: List[Tensor] = []
    b_hh: List[Tensor] = []
    w_hr: List[Tensor] = []
    for d in range(num_dirs):
        base = first + d * per_direction
        w_ih.append(weights[base])
        w_hh.append(weights[base + 1])
        if has_bias:
            b_ih.append(weights[base + 2])
            b_hh.append(weights[base + 3])
        if has_proj:
            w_hr.append(weights[base + per_direction - 1])
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _requires_grad(tensors: List[Tensor]) -> bool:
    for t in tensors:
        if t.requires_grad:
            return True
    return False


def _layer(cell: str, x: Tensor, weights: List[Tensor], first: int, num_dirs: int,
           has_bias: bool, has_proj: bool, h0: Optional[Tensor], c0: Optional[Tensor],
           lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer, all directions: x [T, B, I] -> (out [T, B, D*P], h_n [D, B, P], c_n [D, B, H]
    for LSTM, else an empty tensor). The projection and bias handling of functional._layer
    (functional.folds_bias: when b_ih joins b_hh in the kernel's bias)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = _layer_tensors(weights, first, num_dirs, has_bias, has_proj)
    gates = w_hh[0].size(0)
    if x.size(1) == 0 or gates == 0:  # B = 0 or H = 0, as functional._empty_layer
        zero = x.sum() * 0  # the graph stays connected to the input, states and weights
        for t in w_ih + w_hh + b_ih + b_hh + w_hr:
            zero = zero + t.sum() * 0
        if h0 is not None:
            zero = zero + h0.sum() * 0
        if c0 is not None:
            zero = zero + c0.sum() * 0
        state = w_hh[0].size(1)
        hidden = w_ih[0].size(0) // (4 if cell == "lstm" else 3 if cell == "gru" else 1)
        out = x.new_zeros(x.size(0), x.size(1), num_dirs * state) + zero
        cn = x.new_zeros(num_dirs, x.size(1), hidden) + zero if cell == "lstm" else x.new_empty(0)
        return out, x.new_zeros(num_dirs, x.size(1), state) + zero, cn
    fold_bias = has_bias and folds_bias(cell, x.dtype, x.device)
    proj_bias: Optional[Tensor] = None
    if has_bias and not fold_bias:
        proj_bias = torch.cat(b_ih) if num_dirs > 1 else b_ih[0]
    xproj = F.linear(x, torch.cat(w_ih) if num_dirs > 1 else w_ih[0], proj_bias)
    if xproj.dtype != x.dtype:  # (TorchScript's autocast ran the GEMM in its dtype: the script
        xproj = xproj.to(x.dtype)  # runs in the input's, see above)
    recurrent_bias: List[Tensor] = b_hh
    if fold_bias:
        recurrent_bias = [b_ih[d] + b_hh[d] for d in range(num_dirs)]
    save = torch.is_grad_enabled() and _requires_grad([xproj] + w_hh + recurrent_bias + w_hr)
    if h0 is not None:
        save = save or (torch.is_grad_enabled() and h0.requires_grad)
    if c0 is not None:
        save = save or (torch.is_grad_enabled() and c0.requires_grad)
    out, hn, cn, _, _, _ = torch.ops.fusedrnn.layer_forward(
        cell, xproj, h0, c0 if cell == "lstm" else None, w_hh, recurrent_bias, w_hr, [],
        lengths, save)
    return out, hn, cn


def _compute_dtype(input: Tensor) -> torch.dtype:
    """float16 CPU tensors run in float32, as functional._compute_dtype does for the _cpu backend
    (a script does not see FUSEDRNN_BACKEND: under emu it upcasts too); bfloat16 runs natively
    on every backend."""
    if input.device.type == "cpu" and input.dtype == torch.float16:
        return torch.float32
    return input.dtype


def rnn(cell: str, x: Tensor, h0_all: Optional[Tensor], c0_all: Optional[Tensor],
        weights: List[Tensor], num_layers: int, num_dirs: int, has_bias: bool, has_proj: bool,
        dropout: float, training: bool, lengths: Optional[Tensor],
        lengths_cpu: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The stacked layers over a time-major x [T, B, I] (states [L*D, B, .] or None; lengths [B]
    on x's device, from `lengths=` or a packed input, and for a packed input lengths_cpu, the
    same on the CPU). Returns (output [T, B, D*P], h_n [L*D, B, P], c_n [L*D, B, H] for LSTM,
    else an empty tensor), in the input's dtype."""
    out_dtype = x.dtype
    dtype = _compute_dtype(x)
    if dtype != out_dtype:
        x = x.to(dtype)
        weights = [w.to(dtype) for w in weights]
        if h0_all is not None:
            h0_all = h0_all.to(dtype)
        if c0_all is not None:
            c0_all = c0_all.to(dtype)
    per_layer = num_dirs * (2 + (2 if has_bias else 0) + (1 if has_proj else 0))
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer in range(num_layers):
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        # One layer: no slice (in training, no SliceBackward zero-fill), as functional._rnn.
        if h0_all is not None:
            h0 = (h0_all if num_layers == 1 else
                  h0_all[layer * num_dirs:(layer + 1) * num_dirs]).contiguous()
        if c0_all is not None:
            c0 = (c0_all if num_layers == 1 else
                  c0_all[layer * num_dirs:(layer + 1) * num_dirs]).contiguous()
        x, hn, cn = _layer(cell, x, weights, layer * per_layer, num_dirs, has_bias, has_proj,
                           h0, c0, lengths)
        h_n.append(hn)
        c_n.append(cn)
        if training and dropout > 0 and layer < num_layers - 1:
            if lengths_cpu is not None:  # a packed input's (sorted) lengths
                x = _packing.packed_dropout(x, lengths_cpu, dropout)
            elif lengths is not None:
                x = _packing.dropout_as_packed(x, lengths, dropout)
            else:
                x = F.dropout(x, dropout, True)
    h = torch.cat(h_n) if num_layers > 1 else h_n[0]
    c = torch.cat(c_n) if num_layers > 1 else c_n[0]
    if dtype != out_dtype:
        x, h, c = x.to(out_dtype), h.to(out_dtype), c.to(out_dtype)
    return x, h, c


def packed_rnn(cell: str, data: Tensor, batch_sizes: Tensor, h0_all: Optional[Tensor],
               c0_all: Optional[Tensor], weights: List[Tensor], num_layers: int, num_dirs: int,
               has_bias: bool, has_proj: bool, dropout: float, training: bool
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """rnn() over a PackedSequence's data [N, I] (sorted batch order, states in that order too):
    padded to [T, B, I] with per-sequence lengths, packed again after. Returns (packed output
    data [N, D*P], h_n, c_n or an empty tensor)."""
    padded, lengths_cpu = torch._pad_packed_sequence(data, batch_sizes, False, 0.0,
                                                     batch_sizes.size(0))
    lengths = lengths_cpu.to(data.device)
    out, h, c = rnn(cell, padded, h0_all, c0_all, weights, num_layers, num_dirs, has_bias,
                    has_proj, dropout, training, lengths, lengths_cpu)
    out_data, _ = torch._pack_padded_sequence(out, lengths_cpu, False)
    return out_data, h, c


def _cell_state(name: str, what: str, state: Optional[Tensor], input: Tensor, x: Tensor,
                hidden_size: int) -> Optional[Tensor]:
    """A cell's state ([B, H], or [H] with an unbatched input; its rank 1 or 2 is checked
    already) with its shape checked (torch.nn's and _validation.check_cell_hidden's texts; dtype
    and device come later, as there) and made a layer's initial state [1, B, H] for the batched
    input x [B, I]."""
    if state is None:
        return None
    if state.dim() != input.dim():
        layout = "2-D (batch, hidden_size)" if input.dim() == 2 else "1-D (hidden_size)"
        kind = "batched 2-D" if input.dim() == 2 else "unbatched 1-D"
        raise RuntimeError(f"{name}: {what} must be {layout} for {kind} input, got shape "
                           f"{shape_text(state.shape)}")
    state = state if input.dim() == 2 else state.unsqueeze(0)
    if state.size(0) != x.size(0):
        raise RuntimeError(f"Input batch size {x.size(0)} doesn't match {what} batch size "
                           f"{state.size(0)}")
    if state.size(1) != hidden_size:
        raise RuntimeError(f"{what} has inconsistent hidden_size: got {state.size(1)}, "
                           f"expected {hidden_size}")
    return state.unsqueeze(0)


def check_cell_ranks(name: str, input: Tensor, h: Optional[Tensor], c: Optional[Tensor],
                     h_what: str) -> None:
    """torch.nn's cells' first checks: input, then each state, of rank 1 or 2 (ValueError)."""
    if input.dim() != 1 and input.dim() != 2:
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    _check_cell_state_rank(name, h, h_what)
    _check_cell_state_rank(name, c, "hx[1]")


def _check_cell_state_rank(name: str, state: Optional[Tensor], what: str) -> None:
    """torch.nn's cells: a state of rank other than 1 or 2 is a ValueError, before anything
    else of the states is checked."""
    if state is not None and state.dim() != 1 and state.dim() != 2:
        raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {state.dim()}D instead")


def cell_step(cell: str, name: str, input: Tensor, h: Optional[Tensor], c: Optional[Tensor],
              weights: List[Tensor], input_size: int, hidden_size: int
              ) -> Tuple[Tensor, Tensor]:
    """One step of LSTMCell/GRUCell/RNNCell (input [B, I] or [I], states of the same batching,
    None for zeros), as a one-step sequence through rnn(). Returns (h', c' for LSTM, else an
    empty tensor), batched like the input. Every shape is checked before any dtype, in torch.nn's
    order."""
    check_cell_ranks(name, input, h, c, "hx[0]" if cell == "lstm" else "hidden")
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    if x.size(1) != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {x.size(1)} expected "
                           f"{input_size}")
    h = _cell_state(name, "hidden0", h, input, x, hidden_size)
    c = _cell_state(name, "hidden1", c, input, x, hidden_size)
    check_input(x, weights[0], input_size, 2)
    if h is not None:
        check_state_dtype_and_device(h, x, "hidden0")
    if c is not None:
        check_state_dtype_and_device(c, x, "hidden1")
    has_bias = len(weights) == 4
    _, h_n, c_n = rnn(cell, x.unsqueeze(0), h, c, weights, 1, 1, has_bias, False, 0.0, False,
                      None)
    h_out = h_n[0] if batched else h_n[0, 0]
    if cell != "lstm":
        return h_out, c_n
    return h_out, c_n[0] if batched else c_n[0, 0]
