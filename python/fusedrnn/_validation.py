"""Argument checks for the modules, done in Python before any native call.

Each check raises the exception class torch.nn raises for the same mistake (so code written against
torch.nn keeps catching it), with a message that names the argument and the expected and received
shape, dtype or device. Where torch.nn's class for one mistake depends on an accident of its
implementation (an LSTM state that is not a pair fails with RuntimeError, TypeError or IndexError
depending on what was passed), the error subclasses all of them.
"""
from __future__ import annotations

import numbers
import warnings

from torch import Tensor


class HiddenStateError(RuntimeError, TypeError, IndexError, AttributeError):
    """An LSTM state that is not a pair (h_0, c_0) of tensors.

    torch.nn raises RuntimeError, TypeError, IndexError or AttributeError for this depending on
    what was passed; this subclasses all four so any handler written for torch.nn catches it.
    """


class NegativeSizeError(ValueError, RuntimeError):
    """A cell's hidden_size below zero: torch.nn's cells fail with RuntimeError (from torch.empty),
    its RNN modules with ValueError."""


# --- constructor arguments -----------------------------------------------------------------------

def check_rnn_arguments(mode: str, input_size, hidden_size, num_layers, bias, batch_first,
                        dropout, bidirectional, proj_size) -> None:
    """The checks of torch.nn.RNNBase.__init__, in the same order, with the same classes."""
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
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be greater than zero, got num_layers={num_layers}")
    if not isinstance(proj_size, int) or isinstance(proj_size, bool):
        raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections, "
                         f"got proj_size={proj_size}")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size, got "
                         f"proj_size={proj_size} and hidden_size={hidden_size}")
    if proj_size > 0 and mode != "LSTM":
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


def check_nonlinearity(nonlinearity) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(
            f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def check_cell_arguments(input_size, hidden_size, bias) -> None:
    """torch.nn's cells check nothing themselves; these are the failures their torch.empty calls
    produce, with readable messages."""
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value < 0:
            raise NegativeSizeError(f"{name} must not be negative, got {name}={value}")


def _check_type(name: str, value, expected: type) -> None:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise TypeError(f"{name} should be of type {expected.__name__}, got: {type(value).__name__}")


# --- forward arguments ---------------------------------------------------------------------------

def check_input_dim(name: str, input: Tensor, allowed: tuple) -> None:
    """torch.nn raises ValueError for an input of the wrong rank."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in allowed:
        dims = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(f"{name}: Expected input to be {dims}, got {input.dim()}D instead "
                         f"(input shape {tuple(input.shape)})")


def check_input(input: Tensor, weight: Tensor, input_size: int, expected_dim: int) -> None:
    """torch.nn.RNNBase.check_input: dtype (ValueError), rank and feature size (RuntimeError)."""
    if input.dtype != weight.dtype:
        raise ValueError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
    if input.dim() != expected_dim:
        raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
    if input.size(-1) != input_size:
        raise RuntimeError("input.size(-1) must be equal to input_size. "
                           f"Expected {input_size}, got {input.size(-1)}")
    if input.device != weight.device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{input.device} and parameter tensor at {weight.device}")


def check_sequence_length(seq_len: int) -> None:
    if seq_len == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN, got an input "
                           "with 0 time steps")


def split_lstm_state(hx, what: str = "hx"):
    """An LSTM state must be a pair (h_0, c_0) of tensors (a tuple or list, as torch.nn accepts)."""
    if not isinstance(hx, (tuple, list)):
        raise HiddenStateError(
            f"LSTM: {what} must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
            + (f" of shape {tuple(hx.shape)}" if isinstance(hx, Tensor) else ""))
    if len(hx) != 2:
        raise HiddenStateError(
            f"LSTM: {what} must be a tuple (h_0, c_0) of two tensors, got a {type(hx).__name__} "
            f"of {len(hx)} elements")
    for index, value in enumerate(hx):
        if not isinstance(value, Tensor):
            raise HiddenStateError(
                f"LSTM: {what}[{index}] must be a Tensor, got {type(value).__name__}")
    return hx[0], hx[1]


def check_hidden_dim(hx: Tensor, batched: bool, name: str = "hx") -> None:
    """torch.nn: batched input needs a 3-D state, unbatched a 2-D one (RuntimeError)."""
    expected = 3 if batched else 2
    if hx.dim() != expected:
        kind = "batched 3-D" if batched else "unbatched 2-D"
        raise RuntimeError(f"For {kind} input, {name} should also be {expected}-D but got "
                           f"{hx.dim()}-D tensor (shape {tuple(hx.shape)})")


def check_hidden(hx: Tensor, expected_shape: tuple, input: Tensor, name: str = "hx") -> None:
    """Shape (RuntimeError, like torch.nn), device and dtype of one initial state."""
    if tuple(hx.shape) != tuple(expected_shape):
        raise RuntimeError(
            f"Expected {name} size {tuple(expected_shape)} "
            "(num_layers * num_directions, batch, state size), "
            f"got {list(hx.shape)}")
    if hx.device != input.device:
        raise RuntimeError(
            "Input and hidden tensors are not at the same device, found input tensor at "
            f"{input.device} and {name} tensor at {hx.device}")
    if hx.dtype != input.dtype:
        raise RuntimeError(f"Expected {name} dtype {input.dtype} (the input's dtype), "
                           f"got {hx.dtype}")


def check_cell_input(name: str, input: Tensor, input_size: int, weight: Tensor) -> None:
    """A cell's input: rank (ValueError), size, dtype and device (RuntimeError, like torch.nn)."""
    check_input_dim(name, input, (1, 2))
    if input.size(-1) != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} "
                           f"expected {input_size}")
    if input.dtype != weight.dtype:
        raise RuntimeError(f"{name}: input dtype {input.dtype} does not match weight dtype "
                           f"{weight.dtype}")
    if input.device != weight.device:
        raise RuntimeError(f"{name}: input is on {input.device} but the parameters are on "
                           f"{weight.device}")


def check_cell_hidden_dim(name: str, hx: Tensor, what: str) -> None:
    """torch.nn's cells: a state of rank other than 1 or 2 is a ValueError."""
    if not isinstance(hx, Tensor):
        raise TypeError(f"{name}: {what} must be a Tensor, got {type(hx).__name__}")
    if hx.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {hx.dim()}D instead")


def check_cell_hidden(name: str, hx: Tensor, what: str, input: Tensor, hidden_size: int,
                      batched: bool) -> None:
    """One state of a cell against its (already batched) input [B, I]: RuntimeError like torch."""
    if hx.dim() != (2 if batched else 1):
        raise RuntimeError(
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
    if hx.dtype != input.dtype:
        raise RuntimeError(f"{name}: {what} dtype {hx.dtype} does not match input dtype "
                           f"{input.dtype}")
    if hx.device != input.device:
        raise RuntimeError(f"{name}: {what} is on {hx.device} but input is on {input.device}")
