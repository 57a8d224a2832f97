"""What a compiled model runs for an RNN call that needs no gradient: the eager fast path (the
inference plan of _inference.py, or cell steps for a sequence of one step) as ONE custom op,
`fusedrnn::rnn_inference`.

Without it, a compiled no-grad stack ran as its layer ops: per layer a projection GEMM, the bias
sum and `fusedrnn::layer_forward`, which rebuilds the native call's params at every call,
projects on MKL where eager fusedrnn picks oneDNN on AMD CPUs with AVX-512, and runs a one-step
call through the recurrence instead of the cell steps. The op saves that (2-6% of a compiled call at B=1 on a
2-core Zen 4 VM, 1% at B=16; the rest of what a compiled call costs over an eager one is
torch.compile's own runtime). Inductor fuses nothing into an extern GEMM's neighbours, so hiding
the projections in the op loses nothing; with gradients the stack keeps running as layer ops,
whose registered backward AOTAutograd records.

The op finds its plan by the weight tensors themselves (Dynamo hands a compiled graph the
module's parameters): a plan made for the same tensors at the same memory is reused, so a
plan's checks run once per set of weights, as in eager mode. torch.export and the ONNX exporter
keep the layer ops, which their consumers know (_onnx_export translates those).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _backend, _cell_step, _inference
from ._backend import GATE_COUNT, LSTM_CELLS

# What the native modules take at all (a direct call of the op may bring any dtype).
_OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def applies(cell: str, input: Tensor, weights, hx, num_layers: int, num_directions: int,
            lengths, dropout: float, training: bool, needs_grad: bool) -> bool:
    """Whether functional.rnn's call runs as the op: torch.compile is tracing (not torch.export,
    whose programs keep the layer ops), no gradient is needed, no dropout is applied, no lengths,
    and every tensor is of one dtype the plan takes, on one device. Anything else keeps the
    layer ops (which also report bad input)."""
    if (not torch.compiler.is_compiling() or _exporting() or _backend.under_transform()
            or needs_grad or lengths is not None
            or (training and dropout > 0 and num_layers > 1) or input.dim() != 3
            # autocast: functional.rnn casts to the autocast dtype, which the plan may not take
            or torch.is_autocast_enabled(input.device.type)
            or input.dtype not in _inference.PLAN_DTYPES.get(input.device.type, ())):
        return False
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    tensors = [t for t in states if t is not None]
    tensors += [w for layer in weights for w in layer if w is not None]
    if not all(isinstance(t, Tensor) and t.dtype == input.dtype and t.device == input.device
               for t in tensors):
        return False
    # Empty sizes take the layer ops' empty-layer path; the op's flat weight list needs every
    # entry to have the same weights present (functional.rnn takes a peephole entry of None, or
    # a layer without a projection, and its layer ops report what is wrong).
    return (input.numel() > 0 and weights[0][1].numel() > 0
            and len({_present(entry) for entry in weights}) == 1)


def _present(entry) -> tuple:
    """Which of a layer weights entry's optional members are given: (biases, w_hr, peephole)."""
    return (entry[2] is not None, entry[4] is not None, len(entry) > 5 and entry[5] is not None)


def run(cell: str, input: Tensor, weights, hx, num_layers: int, num_directions: int,
        batch_first: bool):
    """functional.rnn's result through the op: (output, h_n, c_n or None)."""
    h0, c0 = (hx if cell in LSTM_CELLS else (hx, None)) if hx is not None else (None, None)
    x = input.transpose(0, 1) if batch_first else input
    has_bias, has_proj, has_peephole = _present(weights[0])
    flat = [w for layer in weights for w in layer if w is not None]
    output, h_n, c_n = rnn_inference(cell, x, h0, c0, flat, num_layers, num_directions,
                                     has_bias, has_proj, has_peephole)
    output = output.transpose(0, 1) if batch_first else output
    return output, h_n, c_n if cell in LSTM_CELLS else None


def _exporting() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return exporting is not None and exporting()


@torch.library.custom_op("fusedrnn::rnn_inference", mutates_args=())
def rnn_inference(cell: str, x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                  weights: list[Tensor], num_layers: int, num_directions: int, has_bias: bool,
                  has_proj: bool, has_peephole: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked RNN's inference forward. x [T, B, I]; h0 [L*D, B, P], c0 [L*D, B, H] or None;
    weights: per layer and direction w_ih, w_hh, then b_ih, b_hh, w_hr and the peephole
    weights where the flags say so. Returns (output [T, B, D*P], h_n [L*D, B, P], c_n [L*D, B, H],
    an empty tensor for cells without c)."""
    layer_weights = _layer_tuples(cell, weights, num_layers, num_directions, has_bias, has_proj,
                                  has_peephole)
    _check_input_and_states(cell, x, h0, c0, weights, num_layers * num_directions)
    if x.size(0) == 1 and _cell_step.applies(x, dims=3) and not _cell_step.stack_problem(
            cell, x, layer_weights, h0, c0, num_layers, num_directions):
        result = _cell_step.stack(cell, x, layer_weights, h0, c0, num_layers, num_directions)
    else:
        plan = _plan(cell, layer_weights, num_layers, num_directions, x.shape[2])
        result = plan.run(x, h0, c0)
    output, h_n, c_n = result
    return output, h_n, c_n if c_n is not None else x.new_empty(0)


@rnn_inference.register_fake
def _rnn_inference_fake(cell, x, h0, c0, weights, num_layers, num_directions, has_bias, has_proj,
                        has_peephole):
    layer_weights = _layer_tuples(cell, weights, num_layers, num_directions, has_bias, has_proj,
                                  has_peephole)
    _check_input_and_states(cell, x, h0, c0, weights, num_layers * num_directions)
    _check_weights(cell, layer_weights, num_directions, x.shape[2])
    state, hidden = weights[1].shape[1], weights[1].shape[0] // GATE_COUNT[cell]
    seq_len, batch, states = x.shape[0], x.shape[1], num_layers * num_directions
    c_n = x.new_empty(states, batch, hidden) if cell in LSTM_CELLS else x.new_empty(0)
    return (x.new_empty(seq_len, batch, num_directions * state),
            x.new_empty(states, batch, state), c_n)


# The checks of every size the native calls trust (the op is public as
# torch.ops.fusedrnn.rnn_inference): ValueError naming the argument. The weights' own checks
# run when a plan is made for them (_plan): a plan is reused only for the same tensors in the
# same memory, which passed them.

def _layer_tuples(cell, weights, num_layers, num_directions, has_bias, has_proj,
                  has_peephole) -> list:
    """The flat weights as functional.rnn's layer tuples, their count checked."""
    if cell not in GATE_COUNT:
        raise ValueError(f"fusedrnn::rnn_inference: cell must be one of {sorted(GATE_COUNT)}, "
                         f"got {cell!r}")
    if (has_proj or has_peephole) and cell not in LSTM_CELLS:
        raise ValueError(f"fusedrnn::rnn_inference: a {cell} has no projection or peephole "
                         f"weights")
    per_layer = 2 + 2 * has_bias + has_proj + has_peephole
    entries = num_layers * num_directions
    if num_layers < 1 or num_directions not in (1, 2) or len(weights) != entries * per_layer:
        raise ValueError(f"fusedrnn::rnn_inference: expected {entries} x {per_layer} weights "
                         f"(num_layers={num_layers}, num_directions={num_directions}), got "
                         f"{len(weights)}")
    layer_weights = []
    for index in range(entries):
        w = list(weights[index * per_layer:(index + 1) * per_layer])
        w_ih, w_hh = w.pop(0), w.pop(0)
        b_ih, b_hh = (w.pop(0), w.pop(0)) if has_bias else (None, None)
        w_hr = w.pop(0) if has_proj else None
        layer_weights.append((w_ih, w_hh, b_ih, b_hh, w_hr, *w))
    return layer_weights


def _check_input_and_states(cell, x, h0, c0, weights, entries: int) -> None:
    """x [T, B, I] with T, B > 0, of the first layer's width, dtype and device; h0, c0 of the
    shapes the first w_hh implies."""
    w_ih, w_hh = weights[0], weights[1]
    if x.dtype not in _OP_DTYPES:
        raise ValueError(f"fusedrnn::rnn_inference: x must be one of {list(_OP_DTYPES)}, got "
                         f"{x.dtype}")
    if (x.dim() != 3 or w_ih.dim() != 2 or w_hh.dim() != 2 or x.shape[2] != w_ih.shape[1]
            or x.dtype != w_ih.dtype or x.device != w_ih.device):
        raise ValueError(f"fusedrnn::rnn_inference: x must be [T, B, {list(w_ih.shape)[-1]}] "
                         f"{w_ih.dtype} on {w_ih.device} (the first w_ih's width, dtype and "
                         f"device), got {x.dtype} {tuple(x.shape)} on {x.device}")
    hidden = w_hh.shape[0] // GATE_COUNT[cell]
    if x.shape[0] == 0 or x.shape[1] == 0 or hidden == 0:
        raise ValueError(f"fusedrnn::rnn_inference: empty sizes are not taken (T={x.shape[0]}, "
                         f"B={x.shape[1]}, hidden={hidden}); functional.rnn handles them")
    for name, t, size in (("h0", h0, w_hh.shape[1]), ("c0", c0, hidden)):
        expected = (entries, x.shape[1], size)
        if t is not None and (tuple(t.shape) != expected or t.dtype != x.dtype
                              or t.device != x.device):
            raise ValueError(f"fusedrnn::rnn_inference: {name} must be {list(expected)} "
                             f"{x.dtype} on {x.device}, got {t.dtype} {tuple(t.shape)} on "
                             f"{t.device}")
    if c0 is not None and cell not in LSTM_CELLS:
        raise ValueError(f"fusedrnn::rnn_inference: a {cell} has no c0")


def _check_weights(cell, layer_weights, num_directions: int, input_size: int) -> None:
    """Every weight of the first's dtype and device, of the shapes a stack of that input size
    has."""
    first = layer_weights[0][1]
    if any(w is not None and (w.dtype != first.dtype or w.device != first.device)
           for layer in layer_weights for w in layer):
        raise ValueError("fusedrnn::rnn_inference: every weight must have x's dtype and device")
    state, hidden = first.shape[1], first.shape[0] // GATE_COUNT[cell]
    if not _inference.weight_shapes_fit(cell, layer_weights, num_directions, input_size, hidden,
                                        state):
        raise ValueError(f"fusedrnn::rnn_inference: weight shapes do not fit a {cell} stack of "
                         f"input size {input_size}, hidden size {hidden}, state size {state}")


def _plan(cell: str, layer_weights: list, num_layers: int, num_directions: int,
          input_size: int):
    """An inference plan of these weights: the one made for the same tensors at the same memory
    (kept while the first weight lives), else a new one, after checking the weights."""
    params = tuple(w for layer in layer_weights for w in layer if w is not None)
    # Which weight is which (the flags' layout) is part of the key: the same tensors read with
    # other flags (a projection's W_hr as a peephole weight) got the first plan (review, s29).
    roles = tuple(tuple(w is not None for w in layer) for layer in layer_weights)
    shape = (cell, num_layers, num_directions, input_size, roles)
    cached = _plans.get(params[0])
    if cached is not None and cached[0] == shape and cached[1].matches(params):
        return cached[1].plan
    _check_weights(cell, layer_weights, num_directions, input_size)
    # Built on detached views (the same memory, so in-place updates are seen): the plan must not
    # hold the weights themselves, or the cache entry keyed by the first would keep it alive.
    views = [tuple(w.detach() if w is not None else None for w in layer) for layer in layer_weights]
    plan = _inference.InferencePlan(cell, views, num_layers, num_directions)
    if plan.points_into_parameters:
        _plans[params[0]] = (shape, _inference._CachedPlan(plan, params))
    else:
        _plans.pop(params[0], None)  # an outdated plan would keep the old weights alive
    return plan


# First weight -> ((cell, layers, directions, input size), _CachedPlan), by identity (a tensor's ==
# compares elements). Nothing in an entry holds its key, so an entry goes with its weights.
_plans = WeakIdKeyDictionary()


def forget_plan(first_weight: Tensor) -> None:
    """Drops the plan keyed by this weight, if any (see _inference.forget)."""
    _plans.pop(first_weight, None)


def _no_backward(ctx, *grads):
    raise RuntimeError("fusedrnn::rnn_inference has no backward: it runs only when no gradient "
                       "is needed (functional.rnn runs the layer ops otherwise)")


torch.library.register_autograd("fusedrnn::rnn_inference", _no_backward,
                                setup_context=lambda ctx, inputs, output: None)
