"""What the sequence modules (modules.py) and the cells (cell_modules.py) share: their validated
path under torch.jit.trace, the state test of their fast paths, autocast's casts before their
checks, the checks of the LSTM variants' arguments, and torch.nn's initialisation.
"""

import math
import warnings

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import _backend
from ._backend import GATE_COUNT
from ._validation import FREED_STORAGE


def _checked_call(method, *args):
    """method(*args): a module's validated full path. While torch.jit.trace records (the
    recurrence then runs as the custom ops, _backend.recording_graph), its input checks compare
    traced sizes, which warns that the trace may not generalize. They are shape checks: the
    traced ops take any T and B (tests/test_trace.py runs traced modules on other shapes), as
    torch.nn's traces do, so those warnings are silenced there."""
    if not torch.jit.is_tracing():
        return method(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return method(*args)


def _is_state(t, shape: tuple, dtype: torch.dtype, device: torch.device) -> bool:
    return (type(t) is Tensor or isinstance(t, Tensor)) and t.dtype is dtype \
        and t.shape == shape and t.device == device


def _follow_autocast(input, hx, weight: Tensor):
    """Under autocast torch.nn accepts an input or state of another float dtype than the
    parameters (autocast casts all of them to its dtype): they are cast to the parameters'
    dtype for the checks, and functional.rnn then runs everything in the autocast dtype. The
    usual case: a state returned by the previous call of a loop (`h = cell(x_t, h)`, truncated
    backpropagation through time) is in the autocast dtype, the next input in float32."""
    data = input.data if isinstance(input, PackedSequence) else input
    if not isinstance(data, Tensor) or not data.is_floating_point() or data.is_meta:
        return input, hx
    if not torch.is_autocast_enabled(data.device.type):
        return input, hx

    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != weight.dtype:
            return t.to(weight.dtype)
        return t

    if isinstance(input, PackedSequence):
        input = input._replace(data=cast(input.data))
    else:
        input = cast(input)
    if isinstance(hx, (tuple, list)):
        hx = type(hx)(cast(s) for s in hx)
    else:
        hx = cast(hx)
    return input, hx


def _check_variant_flags(peephole, coupled_input_forget) -> None:
    for name, value in (("peephole", peephole), ("coupled_input_forget", coupled_input_forget)):
        if not isinstance(value, (bool, np.bool_)):
            kind = type(value)
            kind_name = (kind.__name__ if kind.__module__ == "builtins"
                         else f"{kind.__module__}.{kind.__qualname__}")
            raise TypeError(f"{name} should be of type bool, got: {kind_name}")


def _variant_repr(module) -> str:
    """What extra_repr adds for the LSTM variants a module (sequence or cell) was built with."""
    return "".join(f", {flag}=True" for flag in ("peephole", "coupled_input_forget")
                   if module.__dict__.get(flag))


def _check_parameters(module, cell: str, weights, names) -> None:
    """Every parameter a call reads, by its own name: the shape the module's sizes give it, the
    first parameter's dtype and device, and (eagerly) memory that was not freed, before
    functional.rnn or cell_step see them. Their checks name the layer API's operands
    (w_hh[0], "weights[0]") and take w_hh's rows as the gate width, so a module whose
    weight_hh_l0 was replaced by one of another shape was told that weight_ih_l0 was wrong.
    weights/names: per layer and direction, (w_ih, w_hh, b_ih, b_hh, w_hr, *peephole) and
    their names (None for absent ones), as modules._layer_weights reads them."""
    hidden = module.hidden_size
    proj = getattr(module, "proj_size", 0)
    state = proj if proj > 0 else hidden
    num_directions = 2 if getattr(module, "bidirectional", False) else 1
    gates = GATE_COUNT[cell] * hidden
    coupled = cell == "lstm_cifg"
    what = ""
    if coupled:
        what = " with coupled_input_forget=True (gates f, g, o; peephole rows w_cf, w_co)"
    elif module.__dict__.get("peephole"):
        what = " with peephole=True (rows w_ci, w_cf, w_co)"
    first, first_name = weights[0][0], names[0][0]
    dtype, device = first.dtype, first.device
    # (A plain tensor's address is read only eagerly: Dynamo, tracing and the torch.func
    # transforms have none to give.)
    eager = _backend.plain_eager()
    for index, (layer, layer_names) in enumerate(zip(weights, names)):
        inputs = module.input_size if index < num_directions else state * num_directions
        expected = ((gates, inputs), (gates, state), (gates,), (gates,), (proj, hidden),
                    (2 if coupled else 3, hidden))
        for tensor, name, shape in zip(layer, layer_names, expected):
            if name is None or tensor is None:
                continue
            if (eager and type(tensor) in (Tensor, torch.nn.Parameter) and tensor.data_ptr() == 0
                    and tensor.numel() > 0 and not tensor.is_meta):
                # (torch's own ops crash on such a tensor: torch.nn's LSTM segfaults)
                raise RuntimeError(f"fusedrnn.{type(module).__name__}: {name} {FREED_STORAGE}")
            if tensor.shape == shape and tensor.dtype is dtype and tensor.device == device:
                continue
            owner = f"fusedrnn.{type(module).__name__}"
            if tensor.shape != shape:
                raise RuntimeError(f"{owner}: {name} must have shape {list(shape)}{what}, "
                                   f"got {list(tensor.shape)}")
            # (Under autocast torch.nn casts every weight to the autocast dtype, as fusedrnn.)
            if tensor.device != device or not (
                    device.type != "meta" and torch.is_autocast_enabled(device.type)):
                raise RuntimeError(
                    f"{owner}: {name} is {tensor.dtype} on {tensor.device} but {first_name} is "
                    f"{dtype} on {device}; a module's parameters must share one dtype and "
                    f"device (module.to(...) moves them all)")


def _refuse_variant(module, what: str) -> None:
    """TorchScript runs the plain LSTM's ops (_script.py): refuse a variant, never run it as
    the plain LSTM."""
    if getattr(module, "_is_variant", False):
        raise RuntimeError(f"fusedrnn.{type(module).__name__}: {what} does not support the "
                           f"peephole and coupled_input_forget variants yet; torch.compile does")


def _reset_uniform(module) -> None:
    """torch.nn's initialisation: every parameter from U(-1/sqrt(H), 1/sqrt(H)), drawn in
    torch.nn's order, then the peephole weights (torch.nn has none). So the same seed gives a
    peephole LSTM's other parameters the values torch.nn.LSTM gets (drawn in registration order,
    each layer's peepholes shifted every later draw)."""
    bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    named = list(module.named_parameters())
    for _, weight in sorted(named, key=lambda item: item[0].startswith("weight_peephole")):
        torch.nn.init.uniform_(weight, -bound, bound)


def _refuse_missing_weight(module, name: str) -> None:
    """A parameter set to None (`module.bias_ih_l0 = None`): torch.nn raises a TypeError from
    inside its op ("expected Tensor as element 2 in argument 2, but got NoneType"); fusedrnn's
    paths raised others (a weak reference to None, None has no shape) or, with one bias left,
    ran without it (found by review, session 29)."""
    why = " (a module built with bias=False has no biases)" if name.startswith("bias") else ""
    raise TypeError(f"{type(module).__name__}: {name} is None, expected a tensor{why}")
