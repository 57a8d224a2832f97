"""Argument checks for the modules and the custom ops, done in Python before any native call.

Each check raises the exception class torch.nn raises for the same mistake (so code written against
torch.nn keeps catching it), with a message that names the argument and the expected and received
shape, dtype or device. Where torch.nn's class for one mistake depends on an accident of its
implementation (an LSTM state that is not a pair fails with RuntimeError, TypeError or IndexError
depending on what was passed), the error subclasses all of them.
"""
from __future__ import annotations

import numbers
import operator
import warnings

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import _backend
from ._backend import DTYPE_CODES, GATE_COUNT, LSTM_CELLS, PEEPHOLE_ROWS, SAVED_GATE_COUNT

# What a tensor whose storage was freed is told (it reads address 0, as an absent operand).
FREED_STORAGE = "has no memory (its storage was freed, e.g. resized to 0 by FSDP's resharding)"


class HiddenStateError(RuntimeError, TypeError, IndexError, AttributeError, ValueError):
    """An LSTM state that is not a pair (h_0, c_0) of tensors.

    torch.nn raises RuntimeError, TypeError, IndexError, AttributeError or ValueError for this
    depending on what was passed (ValueError: an unbatched LSTMCell given one 1-D Tensor, whose
    rows it takes for h and c); this subclasses all five so any handler written for torch.nn
    catches it.
    """


class NotATensorError(TypeError, AttributeError):
    """An input or a cell's state that is not a tensor (None, a list): torch.nn fails with
    AttributeError there (it calls .dim() on it); this is the TypeError it is, and any handler
    written for torch.nn catches it too."""


class StateShapeError(RuntimeError, IndexError):
    """An initial state of the wrong shape: torch.nn raises RuntimeError, or IndexError for an
    LSTM state of too few dimensions next to packed input; this is both."""


class InputDtypeError(ValueError, RuntimeError):
    """An input whose dtype is not the weights': torch.nn raises ValueError (its check_input), or
    RuntimeError from its GEMM for an LSTM on packed input; this is both."""


class WeightShapeError(ValueError, RuntimeError):
    """functional.rnn's w_ih of the wrong shape: ValueError like its other argument errors, and
    RuntimeError like the projection GEMM's error it replaced."""


class PackedSequenceError(ValueError, RuntimeError):
    """A hand-built PackedSequence that is not one (batch_sizes that increase, data rows that
    do not match them): torch.nn fails with a RuntimeError from inside its kernel, or ignores
    extra rows; this is a ValueError that such a handler still catches."""


class NegativeSizeError(ValueError, RuntimeError):
    """A cell's hidden_size below zero: torch.nn's cells fail with RuntimeError (from torch.empty),
    its RNN modules with ValueError."""


# --- constructor arguments -----------------------------------------------------------------------

def check_rnn_arguments(mode: str, input_size, hidden_size, num_layers, bias, batch_first,
                        dropout, bidirectional, proj_size) -> tuple[int, int]:
    """The checks of torch.nn.RNNBase.__init__, in the same order, with the same classes.
    Returns num_layers and proj_size as ints."""
    float(dropout)  # torch.nn converts first: TypeError for None, ValueError for "abc"
    if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
            or not 0 <= dropout <= 1):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got dropout={dropout!r}")
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
            f"expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}", stacklevel=4)
    _check_type("bias", bias, bool)
    _check_type("batch_first", batch_first, bool)
    _check_type("input_size", input_size, int)
    if input_size <= 0:
        raise ValueError(f"input_size must be greater than zero, got input_size={input_size}")
    _check_type("hidden_size", hidden_size, int)
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be greater than zero, got hidden_size={hidden_size}")
    # torch.nn checks only the values of these two: any integer (numpy's, a 0-d integer tensor)
    # passes, which the module then keeps as an int.
    num_layers = integer_size("num_layers", num_layers)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be greater than zero, got num_layers={num_layers}")
    proj_size = integer_size("proj_size", proj_size)
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections, "
                         f"got proj_size={proj_size}")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size, got "
                         f"proj_size={proj_size} and hidden_size={hidden_size}")
    if proj_size > 0 and mode != "LSTM":
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    return num_layers, proj_size


def check_nonlinearity(nonlinearity) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(
            f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def check_cell_arguments(input_size, hidden_size, bias) -> tuple[int, int]:
    """torch.nn's cells check nothing themselves; these are the failures their torch.empty calls
    produce, with readable messages (torch.empty takes any integer: numpy's, a 0-d tensor).
    Returns input_size and hidden_size as ints."""
    sizes = []
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        size = integer_size(name, value)
        if size < 0:
            raise NegativeSizeError(f"{name} must not be negative, got {name}={value}")
        sizes.append(size)
    return sizes[0], sizes[1]


def integer_size(name: str, value) -> int:
    """value as an int where it is an integer of any kind (operator.index), else TypeError."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}") from None


def _check_type(name: str, value, expected: type) -> None:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise TypeError(f"{name} should be of type {expected.__name__}, got: {type(value).__name__}")


# --- forward arguments ---------------------------------------------------------------------------

def check_input_dim(name: str, input: Tensor, allowed: tuple) -> None:
    """torch.nn raises ValueError for an input of the wrong rank."""
    if not isinstance(input, Tensor):
        raise NotATensorError(
            f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in allowed:
        dims = " or ".join(f"{d}D" for d in allowed)
        # Word for word torch.nn's text, which says "tensor" for nn.RNN only.
        noun = " tensor" if name == "RNN" else ""
        raise ValueError(f"{name}: Expected input to be {dims}, got {input.dim()}D{noun} instead "
                         f"(input shape {tuple(input.shape)})")


def check_lengths_input(name: str, input) -> None:
    """A module's `lengths` (fusedrnn's, torch.nn has none) goes with a batched padded tensor:
    a PackedSequence carries its own lengths, and an unbatched input is one sequence. Other
    input ranks are reported as torch.nn reports them (check_input_dim)."""
    if isinstance(input, PackedSequence):
        raise ValueError(lengths_with_packed_text(name))
    if isinstance(input, Tensor) and input.dim() == 2:
        raise ValueError(lengths_unbatched_text(name, str(tuple(input.shape))))


def check_input(input: Tensor, weight: Tensor, input_size: int, expected_dim: int) -> None:
    """torch.nn.RNNBase.check_input: dtype (ValueError), rank and feature size (RuntimeError)."""
    if input.dtype != weight.dtype:
        raise input_dtype_error(input, weight)
    if input.dim() != expected_dim:
        raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
    if input.size(-1) != input_size:
        raise RuntimeError("input.size(-1) must be equal to input_size. "
                           f"Expected {input_size}, got {input.size(-1)}")
    if input.device != weight.device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{input.device} and parameter tensor at {weight.device}")


def input_dtype_error(input: Tensor, weight: Tensor) -> InputDtypeError:
    """torch.nn's error for an input whose dtype is not the weights'."""
    return InputDtypeError(
        f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
        f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")


def check_sequence_length(seq_len: int) -> None:
    if seq_len == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN, got an input "
                           "with 0 time steps")


def check_packed_sequence(name: str, data: Tensor, batch_sizes: Tensor, rows: int) -> None:
    """A PackedSequence built by hand must still be one: its batch_sizes never increase from one
    step to the next (sequences end, none start), and its data has a row for every entry they
    count. rows: the entries the layout built from batch_sizes found. (torch.nn fails deep in its
    kernel with an unrelated message, or, given extra data rows, ignores them.)"""
    if batch_sizes.dim() != 1 or bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
        raise PackedSequenceError(
            f"{name}: a PackedSequence's batch_sizes must be a 1-D tensor that never increases "
            f"from one step to the next, got {batch_sizes.tolist()}; build it with "
            "torch.nn.utils.rnn.pack_padded_sequence or pack_sequence")
    if data.size(0) != rows:
        raise PackedSequenceError(
            f"{name}: a PackedSequence's data must have one row per entry its batch_sizes count "
            f"(their sum, {rows}), got {data.size(0)} rows")


def split_lstm_state(hx, what: str = "hx", owner: str = "LSTM"):
    """An LSTM state must be a pair (h_0, c_0) of tensors (a tuple or list, as torch.nn accepts).
    owner: the module the message names (LSTM, LSTMCell, a variant)."""
    if not isinstance(hx, (tuple, list)):
        raise HiddenStateError(
            f"{owner}: {what} must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
            + (f" of shape {tuple(hx.shape)}" if isinstance(hx, Tensor) else ""))
    if len(hx) != 2:
        raise HiddenStateError(
            f"{owner}: {what} must be a tuple (h_0, c_0) of two tensors, got a "
            f"{type(hx).__name__} of {len(hx)} elements")
    for index, value in enumerate(hx):
        if not isinstance(value, Tensor):
            raise HiddenStateError(
                f"{owner}: {what}[{index}] must be a Tensor, got {type(value).__name__}")
    return hx[0], hx[1]


def check_rnn_state_structure(cell: str, hx) -> None:
    """functional.rnn's hx: None, (h_0, c_0) for an LSTM cell (either None for zeros, as
    reference.rnn takes them), h_0 for the others (the shapes are checked per layer). The
    modules check theirs with split_lstm_state, which takes no None."""
    if hx is None:
        return
    if cell in LSTM_CELLS:
        if (not isinstance(hx, (tuple, list)) or len(hx) != 2
                or not all(t is None or isinstance(t, Tensor) for t in hx)):
            raise ValueError(f"hx must be None or a pair (h_0, c_0) of tensors (either None for "
                             f"zeros) for cell {cell!r}, got {_describe(hx)}")
    elif not isinstance(hx, Tensor):
        raise ValueError(f"hx must be None or a tensor h_0 for cell {cell!r}, got {_describe(hx)}")


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        items = ", ".join(_describe(v) for v in value)
        return f"a {type(value).__name__} of {len(value)}: ({items})"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_input_weights(input: Tensor, weights, num_directions: int) -> None:
    """functional.rnn's weights: each w_ih is [rows of its w_hh, the layer's input width]. The
    input projection would otherwise fail inside torch's GEMM with a message that names neither
    (the rest is checked per layer, check_layer_forward)."""
    if not isinstance(input, Tensor) or input.dim() != 3:
        return  # (the layer's checks report it)
    width = input.shape[2]
    for index, entry in enumerate(weights):
        w_ih, w_hh = entry[0], entry[1]
        if index > 0 and index % num_directions == 0:  # a later layer takes the one before's output
            before = weights[index - 1][1]
            if not isinstance(before, Tensor) or before.dim() != 2:
                return  # (the layer's checks report it)
            width = num_directions * before.shape[1]
        if not (isinstance(w_ih, Tensor) and isinstance(w_hh, Tensor)) or w_hh.dim() != 2:
            continue  # (the layer's checks report it)
        if w_ih.dim() != 2 or w_ih.shape[0] != w_hh.shape[0] or w_ih.shape[1] != width:
            layer, direction = divmod(index, num_directions)
            raise WeightShapeError(
                f"w_ih of weights[{index}] (layer {layer}{', reverse' if direction else ''}) must "
                f"be [{w_hh.shape[0]}, {width}] (w_hh's rows, the layer's input width), got "
                f"{list(w_ih.shape)}")


def check_hidden_dims(states, names, batched: bool) -> None:
    """torch.nn: batched input needs 3-D states, unbatched 2-D ones (RuntimeError). The text is
    torch.nn's, which names the states hx (and cx) and checks an LSTM's two together, followed by
    the shapes."""
    expected = 3 if batched else 2
    if all(state.dim() == expected for state in states):
        return
    kind = "batched 3-D" if batched else "unbatched 2-D"
    shapes = ", ".join(f"{name} shape {tuple(state.shape)}" for state, name in zip(states, names))
    if len(states) == 1:
        got = f"{states[0].dim()}-D tensor"
    else:
        got = "(" + ", ".join(f"{state.dim()}-D" for state in states) + ") tensors"
    which = "hx and cx" if len(states) == 2 else "hx"
    raise RuntimeError(f"For {kind} input, {which} should also be {expected}-D but got {got} "
                       f"({shapes})")


# What torch.nn's messages call a module's initial states.
_TORCH_STATE_NAME = {"hx": "hidden", "h_0": "hidden[0]", "c_0": "hidden[1]"}


def check_hidden_shape(hx: Tensor, expected_shape: tuple, name: str = "hx") -> None:
    """The shape of one initial state (RuntimeError, with torch.nn's text first). torch.nn checks
    every state's shape before any dtype: check_hidden_placement comes after all of them."""
    if tuple(hx.shape) != tuple(expected_shape):
        raise StateShapeError(
            f"Expected {_TORCH_STATE_NAME.get(name, name)} size {tuple(expected_shape)}, "
            f"got {list(hx.shape)} ({name} is [num_layers * num_directions, batch, "
            f"{'hidden_size' if name == 'c_0' else 'proj_size or hidden_size'}])")


def check_hidden_placement(hx: Tensor, input: Tensor, name: str = "hx") -> None:
    """The device and dtype of one initial state, against the input's."""
    if hx.device != input.device:
        raise RuntimeError(
            "Input and hidden tensors are not at the same device, found input tensor at "
            f"{input.device} and {name} tensor at {hx.device}")
    if hx.dtype != input.dtype:
        raise RuntimeError(f"Expected {name} dtype {input.dtype} (the input's dtype), "
                           f"got {hx.dtype}")


def check_cell_input_size(input: Tensor, input_size: int) -> None:
    """A cell's (rank-checked) input [B, I]: its width, with torch.nn's text."""
    if input.size(-1) != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} "
                           f"expected {input_size}")


def check_cell_hidden_dim(name: str, hx: Tensor, what: str) -> None:
    """torch.nn's cells: a state of rank other than 1 or 2 is a ValueError."""
    if not isinstance(hx, Tensor):
        raise NotATensorError(f"{name}: {what} must be a Tensor, got {type(hx).__name__}")
    if hx.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {hx.dim()}D instead")


def check_cell_hidden(name: str, hx: Tensor, what: str, input: Tensor, hidden_size: int,
                      batched: bool) -> None:
    """One state of a cell against its (already batched) input [B, I]: rank, batch and width,
    RuntimeError with torch.nn's text. (Dtypes and devices come after every shape:
    check_cell_dtypes_and_devices, in torch.nn's order.)"""
    if hx.dim() != (2 if batched else 1):
        # torch.nn raises RuntimeError, or IndexError for a 1-D state whose size equals the
        # batch of a batched input (it then reads the state's missing second dimension).
        raise StateShapeError(
            f"{name}: {what} must be {'2-D (batch, hidden_size)' if batched else '1-D (hidden_size)'}"
            f" for {'batched 2-D' if batched else 'unbatched 1-D'} input, got shape "
            f"{tuple(hx.shape)}")
    batch = hx.size(0) if batched else 1
    if batch != input.size(0):
        raise RuntimeError(f"Input batch size {input.size(0)} doesn't match {what} batch size "
                           f"{batch} ({what} shape {tuple(hx.shape)})")
    if hx.size(-1) != hidden_size:
        raise RuntimeError(f"{what} has inconsistent hidden_size: got {hx.size(-1)}, "
                           f"expected {hidden_size}")


def check_cell_dtypes_and_devices(name: str, input: Tensor, weight: Tensor, states,
                                  whats) -> None:
    """A cell's input against its weights, then each state against the input (RuntimeError)."""
    if input.dtype != weight.dtype:
        raise RuntimeError(f"{name}: input dtype {input.dtype} does not match weight dtype "
                           f"{weight.dtype}")
    if input.device != weight.device:
        raise RuntimeError(f"{name}: input is on {input.device} but the parameters are on "
                           f"{weight.device}")
    for hx, what in zip(states, whats):
        if hx.dtype != input.dtype:
            raise RuntimeError(f"{name}: {what} dtype {hx.dtype} does not match input dtype "
                               f"{input.dtype}")
        if hx.device != input.device:
            raise RuntimeError(f"{name}: {what} is on {hx.device} but input is on "
                               f"{input.device}")


# --- the custom ops' arguments (_custom_ops.layer_forward / layer_backward) ----------------------
#
# torch.ops.fusedrnn.layer_forward / layer_backward are reachable by anyone, and the native kernels
# get data pointers, not tensors: they trust every size, so one wrong shape is an out-of-bounds
# read or write. The ops therefore check every argument here before allocating or calling
# anything. Compiled models call them once per layer, so the checks are a few attribute reads per
# tensor (about 100 ns each): messages are only built on failure, and the lengths' values, the
# one check that needs a reduction, are left to the native module where it checks them itself.
# The fake kernels run the same checks, so torch.compile reports a bad call while tracing.
# Classes: shapes, dtypes and devices raise RuntimeError (like torch's ops); the cell, the number
# of directions and lengths raise ValueError (like fusedrnn.functional.rnn).

_SIZES = "(D directions, T steps, B batch, G*H gates x hidden, S*H saved gates x hidden, P state)"
_CELL_STATE = "(only an lstm or lstm_cifg has a cell state)"


def check_layer_forward(cell: str, xproj: Tensor, h0, c0, w_hh, b_hh, w_hr, lengths,
                        check_lengths_values: bool, op: str = "fusedrnn::layer_forward",
                        peephole=()) -> None:
    """Every argument of fusedrnn::layer_forward (see there); `op` names the caller in messages.
    c0 of another cell than lstm may be None or empty (a placeholder, which the caller drops)."""
    num_dirs, hidden, state, tensors = _check_layer_weights(op, cell, w_hh, b_hh, w_hr, peephole)
    seq_len, batch = _check_sequence(op, "xproj", xproj, "[T, B, D*G*H]",
                                     num_dirs * GATE_COUNT[cell] * hidden)
    if h0 is not None:
        tensors.append(("h0", h0, "[D, B, P]", (num_dirs, batch, state)))
    if c0 is not None:
        if cell in LSTM_CELLS:
            tensors.append(("c0", c0, "[D, B, H]", (num_dirs, batch, hidden)))
        else:
            _check_unused(op, "c0", c0, f"for {cell} {_CELL_STATE}")
    _check_tensors(op, tensors, xproj, "xproj")
    check_op_lengths(op, lengths, seq_len, batch, xproj, "xproj", check_lengths_values)


def check_layer_backward(cell: str, w_hh, b_hh, w_hr, h0, c0, out: Tensor, gates, c_seq, d_out,
                         d_hn, d_cn, lengths, check_lengths_values: bool, peephole=()) -> None:
    """Every argument of fusedrnn::layer_backward (see there). What the cell has no use for (c0,
    c_seq, d_cn of GRU/RNN, gates of RNN) may be None or empty (layer_forward's placeholders,
    which the caller drops)."""
    op = "fusedrnn::layer_backward"
    num_dirs, hidden, state, tensors = _check_layer_weights(op, cell, w_hh, b_hh, w_hr, peephole)
    seq_len, batch = _check_sequence(op, "out", out, "[T, B, D*P]", num_dirs * state)
    is_lstm = cell in LSTM_CELLS
    saved_width = SAVED_GATE_COUNT[cell] * hidden
    # What the backward kernels read of forward's save=True outputs must be there (a wrong shape,
    # empty included, is left to the shape checks below).
    if saved_width and gates is None:
        raise RuntimeError(f"{op}: gates is required for {cell}: the [D, T, B, S*H] = "
                           f"{[num_dirs, seq_len, batch, saved_width]} gates that layer_forward "
                           f"saved (save=True)")
    if is_lstm and c_seq is None:
        raise RuntimeError(f"{op}: c_seq is required for {cell}: the [D, T, B, H] = "
                           f"{[num_dirs, seq_len, batch, hidden]} cell states that layer_forward "
                           f"saved (save=True)")
    state_shape = (num_dirs, batch, state)
    if h0 is not None:
        tensors.append(("h0", h0, "[D, B, P]", state_shape))
    if d_out is not None:
        tensors.append(("d_out", d_out, "[T, B, D*P]", (seq_len, batch, num_dirs * state)))
    if d_hn is not None:
        tensors.append(("d_hn", d_hn, "[D, B, P]", state_shape))
    if saved_width:
        tensors.append(("gates", gates, "[D, T, B, S*H]",
                        (num_dirs, seq_len, batch, saved_width)))
    else:
        _check_unused(op, "gates", gates, f"for {cell} (it saves no gates)")
    if is_lstm:
        tensors.append(("c_seq", c_seq, "[D, T, B, H]", (num_dirs, seq_len, batch, hidden)))
        cell_shape = (num_dirs, batch, hidden)
        if c0 is not None:
            tensors.append(("c0", c0, "[D, B, H]", cell_shape))
        if d_cn is not None:
            tensors.append(("d_cn", d_cn, "[D, B, H]", cell_shape))
    else:
        for name, t in (("c0", c0), ("c_seq", c_seq), ("d_cn", d_cn)):
            _check_unused(op, name, t, f"for {cell} {_CELL_STATE}")
    _check_tensors(op, tensors, out, "out")
    check_op_lengths(op, lengths, seq_len, batch, out, "out", check_lengths_values)


def check_op_lengths(op: str, lengths, seq_len: int, batch: int, like: Tensor, like_name: str,
                     check_values: bool) -> None:
    """lengths (params.h): [B] int64 on like's device, every entry in [1, T]. The values need a
    reduction (on CUDA a sync): callers skip them where the native module checks them itself
    (the CPU module) and in fake kernels (no data)."""
    if lengths is None:
        return
    if lengths.dtype != torch.int64 or lengths.shape != (batch,) or lengths.device != like.device:
        raise ValueError(f"{op}: lengths must be an int64 tensor of shape [B] = [{batch}] on "
                         f"{like.device} ({like_name}'s device), got {lengths.dtype} of shape "
                         f"{list(lengths.shape)} on {lengths.device}")
    if check_values:
        check_lengths_values(lengths, seq_len, f"{op}: ")


def check_lengths_values(lengths: Tensor, seq_len: int, prefix: str = "",
                         on_device: bool = False) -> None:
    """Every entry of lengths in [1, T], read on the host (a reduction; on CUDA a sync), the
    values of every torch.func.vmap sample at once. on_device, and while a CUDA graph is
    captured, where a sync is not allowed, a device-side assert stops the launch instead (no
    kernel then reads past T). prefix: what the message starts with (an op's name)."""
    in_range = f"{prefix}{lengths_range_text(seq_len)}"
    if on_device or (lengths.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(((lengths >= 1) & (lengths <= seq_len)).all(), in_range)
        return
    low, high = (int(v) for v in torch.aminmax(_all_vmapped(lengths)))
    if low < 1 or high > seq_len:
        raise ValueError(f"{in_range}, got values from {low} to {high}")


def _all_vmapped(t: Tensor) -> Tensor:
    """t without torch.func.vmap's batching: the values of every vmapped sample at once (a
    batched tensor's values cannot be read, .item() raises)."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


# The texts of a module's lengths= checks, also compiled into the TorchScript twins (_script.py:
# a script calls these functions; it cannot format a module-level string).

def lengths_range_text(seq_len: int) -> str:
    return f"lengths must lie in [1, {seq_len}] (T, the sequence length)"


def lengths_kind_text(batch: int, kind: str, shape: str) -> str:
    return (f"lengths must be an integer tensor of shape ({batch},) (one length per sequence), "
            f"got {kind} of shape {shape}")


def lengths_with_packed_text(name: str) -> str:
    return f"{name}: lengths is for a padded tensor input; a PackedSequence carries its own (its " \
           "batch_sizes)"


def lengths_unbatched_text(name: str, shape: str) -> str:
    return (f"{name}: lengths needs a batched input (3D: [T, B, I], or [B, T, I] with "
            f"batch_first), got a 2D (unbatched) input of shape {shape}")


def _check_layer_weights(op: str, cell: str, w_hh, b_hh, w_hr, peephole=()) -> tuple:
    """The cell and the weights' count and sizes: w_hh D in {1, 2} tensors [G*H, P]; b_hh empty
    or D tensors [G*H]; w_hr empty or (LSTM only) D tensors [P, H] with P < H, else P = H;
    peephole empty or (LSTM only) D tensors [3, H] ([2, H] for lstm_cifg).
    Returns (D, H, P, the weights as _check_tensors entries for their dtype and device)."""
    if cell not in GATE_COUNT:  # first: every size below depends on the cell
        raise ValueError(f"{op}: cell must be one of {tuple(GATE_COUNT)}, got {cell!r}")
    num_dirs = len(w_hh)
    if num_dirs not in (1, 2):
        raise ValueError(f"{op}: w_hh must hold 1 or 2 tensors (one per direction), got "
                         f"{num_dirs}")
    if b_hh and len(b_hh) != num_dirs:
        raise ValueError(f"{op}: b_hh must be empty (no bias) or hold one tensor per direction "
                         f"({num_dirs}, like w_hh), got {len(b_hh)}")
    if w_hr and (len(w_hr) != num_dirs or cell not in LSTM_CELLS):
        raise ValueError(f"{op}: w_hr must be empty (no projection) or, for {LSTM_CELLS} only, "
                         f"hold one tensor per direction ({num_dirs}, like w_hh), got "
                         f"{len(w_hr)} for {cell}")
    if peephole and (len(peephole) != num_dirs or cell not in LSTM_CELLS):
        raise ValueError(f"{op}: peephole must be empty (no peephole connections) or, for "
                         f"{LSTM_CELLS} only, hold one tensor per direction ({num_dirs}, like "
                         f"w_hh), got {len(peephole)} for {cell}")
    gate_count = GATE_COUNT[cell]
    weight_shape = w_hh[0].shape
    if len(weight_shape) != 2 or weight_shape[0] % gate_count or 0 in weight_shape:
        raise RuntimeError(f"{op}: w_hh[0] must be a 2-D [G*H, P] tensor with G = {gate_count} "
                           f"for {cell} and H, P >= 1, got shape {list(weight_shape)} {_SIZES}")
    gates_width, state = weight_shape
    hidden = gates_width // gate_count
    if w_hr:
        if state >= hidden:
            raise RuntimeError(f"{op}: with w_hr (a projection) w_hh must be [G*H, P] with P "
                               f"below H = {hidden}, got {list(weight_shape)}")
    elif state != hidden:
        raise RuntimeError(f"{op}: w_hh[0] must be [G*H, H] = {[gates_width, hidden]} without "
                           f"w_hr (no projection), got {list(weight_shape)}")
    tensors = [("w_hh[0]", w_hh[0], "[G*H, P]", weight_shape)]
    if num_dirs == 2:
        tensors.append(("w_hh[1]", w_hh[1], "[G*H, P]", weight_shape))
    if b_hh:
        bias_shape = (gates_width,)
        tensors += [(_B_HH[d], b_hh[d], "[G*H]", bias_shape) for d in range(num_dirs)]
    if w_hr:
        proj_shape = (state, hidden)
        tensors += [(_W_HR[d], w_hr[d], "[P, H]", proj_shape) for d in range(num_dirs)]
    if peephole:
        rows = PEEPHOLE_ROWS[cell]
        tensors += [(_PEEPHOLE[d], peephole[d], f"[{rows}, H]", (rows, hidden))
                    for d in range(num_dirs)]
    return num_dirs, hidden, state, tensors


_B_HH, _W_HR = ("b_hh[0]", "b_hh[1]"), ("w_hr[0]", "w_hr[1]")
_PEEPHOLE = ("peephole[0]", "peephole[1]")



def _check_sequence(op: str, name: str, t: Tensor, layout: str, last: int) -> tuple:
    """A 3-D [T, B, last] sequence (`layout` in the letters of _SIZES) with T, B >= 1 (the
    kernels' minimum, params.h), of a dtype the kernels take. Returns (T, B)."""
    shape = t.shape
    if len(shape) != 3 or shape[0] == 0 or shape[1] == 0 or shape[2] != last:
        raise RuntimeError(f"{op}: {name} must be a 3-D {layout} = [T, B, {last}] tensor with "
                           f"T, B >= 1, got shape {list(shape)} {_SIZES}")
    if t.dtype not in DTYPE_CODES:
        raise RuntimeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got "
                           f"{t.dtype}")
    if t.dtype is torch.float16 and t.device.type == "cpu" and _backend.backend_name() == "cpu":
        # (The modules and functional run float16 CPU tensors in float32; the native CPU
        # module would reject the dtype by its ABI code.)
        raise RuntimeError(f"{op}: {name} is float16, which the CPU kernels do not take "
                           f"(float32, float64 or bfloat16; float16 runs on CUDA): cast it")
    return shape[0], shape[1]


def _check_tensors(op: str, entries, like: Tensor, like_name: str) -> None:
    """Each (name, tensor, layout, shape) entry has its shape and like's dtype and device."""
    dtype, device = like.dtype, like.device
    for name, t, layout, shape in entries:
        # One test on the path every call takes (dtypes are singletons: `is` is exact).
        if t.shape != shape or t.dtype is not dtype or t.device != device:
            if t.shape != shape:
                raise RuntimeError(f"{op}: {name} must have shape {layout} = {list(shape)}, got "
                                   f"{list(t.shape)} {_SIZES}")
            raise RuntimeError(f"{op}: {name} must be {dtype} on {device} like {like_name}, got "
                               f"{t.dtype} on {t.device}")


def _check_unused(op: str, name: str, t, why: str) -> None:
    """What the cell has no use for: None or an empty placeholder."""
    if t is not None and t.numel() != 0:
        raise RuntimeError(f"{op}: {name} must be None or empty {why}, got shape "
                           f"{list(t.shape)}")
