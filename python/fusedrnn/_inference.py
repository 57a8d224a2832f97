"""The modules' no-grad fast path: a per-module plan of everything an inference call does not
need to redo, rebuilt as soon as a parameter is replaced.

At B=1 the recurrence of a small LSTM takes tens of microseconds, so what surrounds it counts:
building the native params structs per call cost more than the kernel (B=1 H=64: ~16 of ~37 us
of fixed cost per call). A plan builds them once: per layer, native templates
(_backend.prepare_forward) that point straight into the W_hh, b_hh and W_hr parameters.

A plan keeps NO derived copy of a weight (no folded b_ih + b_hh, no concatenated W_ih): each call
reads every parameter's current values, so writes that leave a tensor's version counter alone
(fused optimizers, `p.data.add_()`, writes through numpy) are seen like any other. What the plan
fixes is where the weights live: it is valid while the module's parameters are the same tensor
objects with the same data pointers, shapes and strides, which catches .to(), assignments,
functional_call and `.data =`. It holds detached views of the memory its templates point into,
so that memory outlives any swap. Plans live in a weak table beside the modules, never in them:
a deepcopy or pickle of a module must not carry raw pointers into the original's weights. Calls
only read a plan, except for the one block of memory it lends to a large CPU call's input
projection (_projection_buffer); concurrent calls from several threads are safe (each allocates
its own outputs and workspace, and a call that finds the block lent allocates its own). A layer
whose W_hh, b_hh or W_hr is not contiguous, or a module whose weights are not among its
registered parameters (torch.nn.utils parametrizations), get a fresh plan at every call instead.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backend, _input_projection, functional
from ._backend import CPU_DTYPES, GATE_COUNT, LSTM_CELLS, PEEPHOLE_ROWS
from ._projection_buffer import ProjectionBuffer

# The dtypes a plan takes, by device type (asked by the modules' eager fast path and by the
# compiled inference op): on CUDA the half types take the layer ops until a GPU run measures
# the plan in them.
PLAN_DTYPES = {"cpu": CPU_DTYPES, "cuda": (torch.float32, torch.float64)}


class _LayerPlan(NamedTuple):
    w_ih: tuple                     # per direction [G*H, I], the parameters themselves
    b_ih: tuple                     # per direction [G*H] or None, the parameters themselves
    prepared: _backend.PreparedForward
    # Layers that fold their biases (functional.folds_bias): per direction b_hh, the tensor the
    # kernel reads. Their calls project x without b_ih and hand the kernel b_ih + b_hh, summed at
    # every call (never kept): a small input GEMM with a bias costs far more than without on the
    # CPU (B=1 T=100 H=64, 2 threads: ~28 against ~20 us with the sum).
    b_hh: Optional[tuple]


# Not under torch.compiler.disable (its wrapper costs ~2 us a call): the modules never come here
# while compiling (RNNBase._fast_forward), so torch.compile traces functional.rnn's custom ops.
def forward(module, cell: str, num_layers: int, num_directions: int, x: Tensor,
            h0_all: Optional[Tensor], c0_all: Optional[Tensor]):
    """The module's inference forward through its plan (InferencePlan.run: arguments and
    results)."""
    return plan_for(module, cell, num_layers, num_directions).run(x, h0_all, c0_all)


def plan_for(module, cell: str, num_layers: int, num_directions: int):
    """A plan for the module's current weights: its cached one while valid, else a new one
    (cached where the weights allow it). A weight whose shape does not follow the module's
    sizes, or whose dtype or device is not the first weight's, raises by name
    (module._layer_weights checks them: the native calls trust them, and must not read a
    replaced parameter past its end)."""
    params = _own_parameters(module)
    cached = _plans.get(module)
    if cached is not None and cached.matches(params):
        return cached.plan
    layer_weights, used = _layer_weights(module)
    plan = InferencePlan(cell, layer_weights, num_layers, num_directions)
    # Cached only when every weight used is one of the checked parameters (a subclass may
    # register more parameters, e.g. a learnable initial state; they are checked too).
    if plan.points_into_parameters and _all_own(used, params):
        _plans[module] = _CachedPlan(plan, params)
    else:
        _plans.pop(module, None)  # an outdated plan would keep the old weights alive
    return plan


def one_step_weights(module):
    """module._layer_weights() (which checks them, as for plan_for) when every weight is one of
    the module's own parameters; else None (the caller then checks the weights it gets itself,
    against its input and states). Checked once per set of parameters, like a plan, and
    valid on the same terms (the same tensors at the same memory): a streaming call makes one
    step per call, and checking every weight at every step cost about as much as the step
    (RNN B=1 H=64: ~27 of ~51 us)."""
    params = _own_parameters(module)
    cached = _step_weights.get(module)
    # (The weights do not depend on the backend: only the tensors and their memory count.)
    if cached is not None and cached.holds(params):
        return cached.plan
    layer_weights, used = _layer_weights(module)
    if _all_own(used, params):
        _step_weights[module] = _CachedPlan(layer_weights, params)
        return layer_weights
    _step_weights.pop(module, None)
    return None


def _own_parameters(module) -> tuple:
    """The module's registered parameters, without the names registered as None (a subclass's
    `register_parameter("h0", None)`, a bias set to None): a plan holds each weakly and reads its
    address (review, session 31: every no-grad call of such a subclass raised). (A list, not a
    generator: ~150 ns less on the inference fast path.)"""
    return tuple([p for p in module._parameters.values() if p is not None])


def _layer_weights(module):
    """(module._layer_weights(), checked, and the tensors among them)."""
    layer_weights = module._layer_weights()
    return layer_weights, [t for w in layer_weights for t in w if t is not None]


def _all_own(used: list, params: tuple) -> bool:
    """Whether every tensor used is one of the module's registered parameters."""
    return {id(t) for t in used} <= {id(p) for p in params}


def weight_shapes_fit(cell: str, layer_weights: list, num_directions: int, input_size: int,
                      hidden: int, state: int) -> bool:
    """Whether every weight of a stack (functional.rnn's layer weights) has the shape these
    sizes imply."""
    rows = GATE_COUNT[cell] * hidden
    peephole_shape = (PEEPHOLE_ROWS.get(cell), hidden)
    for index, (w_ih, w_hh, b_ih, b_hh, w_hr, *peephole) in enumerate(layer_weights):
        width = input_size if index < num_directions else num_directions * state
        if (w_ih.shape != (rows, width) or w_hh.shape != (rows, state)
                or any(b is not None and b.shape != (rows,) for b in (b_ih, b_hh))
                or (w_hr is not None and w_hr.shape != (state, hidden))
                or (w_hr is None and state != hidden)
                or any(w.shape != peephole_shape for w in peephole)):
            return False
    return True


class InferencePlan:
    """The prepared layers of one module's weights: what each inference call would redo."""

    def __init__(self, cell: str, layer_weights: list, num_layers: int, num_directions: int):
        self.num_directions = num_directions
        w_hh0 = layer_weights[0][1]
        self.state = w_hh0.size(1)
        self.hidden = w_hh0.size(0) // GATE_COUNT[cell]
        self.is_lstm = cell in LSTM_CELLS
        layers = []
        copies = False
        for layer in range(num_layers):
            lw = layer_weights[layer * num_directions:(layer + 1) * num_directions]
            # w_hh, b_hh, w_hr and a peephole LSTM's peephole weights: read by the kernel
            native = [[w[1], w[3], w[4], *w[5:]] for w in lw]
            for tensors in native:
                for i, t in enumerate(tensors):
                    if t is not None and not t.is_contiguous():
                        tensors[i] = t.contiguous()
                        copies = True
            w_hh, b_hh, w_hr, *peephole = (list(column) for column in zip(*native))
            b_ih = tuple(w[2] for w in lw)
            prepared = _backend.prepare_forward(cell, w_hh, b_hh, w_hr,
                                                peephole[0] if peephole else ())
            fold = (all(b is not None for b in (*b_ih, *b_hh))
                    and functional.folds_bias(cell, w_hh[0].dtype, w_hh[0].device))
            layers.append(_LayerPlan(tuple(w[0] for w in lw), b_ih, prepared,
                                     tuple(b_hh) if fold else None))
        # Contiguous copies would not follow later writes to the parameters: such a plan is
        # good for one call only.
        self.points_into_parameters = not copies
        self.layers = layers
        self.projection_buffer = ProjectionBuffer()

    def run(self, x: Tensor, h0_all: Optional[Tensor], c0_all: Optional[Tensor]):
        """x [T, B, I] (time-major, any strides) of the weights' dtype and device; h0_all
        [L*D, B, P], c0_all [L*D, B, H] or None, already checked by the caller.
        Returns (output [T, B, D*P], h_n, c_n or None)."""
        seq_len, batch = x.shape[0], x.shape[1]
        num_dirs, state, hidden = self.num_directions, self.state, self.hidden
        num_states = len(self.layers) * num_dirs
        h_n = x.new_empty(num_states, batch, state)
        c_n = x.new_empty(num_states, batch, hidden) if self.is_lstm else None
        if h0_all is not None:
            h0_all = h0_all.contiguous()
        if c0_all is not None:
            c0_all = c0_all.contiguous()
        # Every layer's projection has the same size and is dead once its layer has run: one
        # kept block serves them all.
        numel = seq_len * batch * num_dirs * self.layers[0].w_ih[0].size(0)
        if not ProjectionBuffer.applies(x, numel):
            return self._run_layers(x, h0_all, c0_all, h_n, c_n, None)
        with self.projection_buffer.lend(x, numel) as block:
            if block is None:  # another call holds it: a block of this call's own, projected
                # the same way (project_into, whose chunks may round otherwise than _project's
                # other road), so that each call gets the bits it gets alone (they differed:
                # review, session 29)
                block = x.new_empty(numel)
            return self._run_layers(x, h0_all, c0_all, h_n, c_n, block)

    def _run_layers(self, x, h0_all, c0_all, h_n, c_n, block: Optional[Tensor]):
        """run()'s layers, each projecting x into `block` where one is lent."""
        seq_len, batch = x.shape[0], x.shape[1]
        num_dirs, state = self.num_directions, self.state
        single = len(self.layers) == 1
        for layer, plan in enumerate(self.layers):
            first, last = layer * num_dirs, (layer + 1) * num_dirs
            if plan.b_hh is None:
                xproj = _project(x, plan.w_ih, plan.b_ih, block)
                biases = None
            else:
                xproj = _project(x, plan.w_ih, (None,) * num_dirs, block)
                biases = [torch.add(bi, bh) for bi, bh in zip(plan.b_ih, plan.b_hh)]
            out = x.new_empty(seq_len, batch, num_dirs * state)
            h0 = h0_all if single or h0_all is None else h0_all[first:last]
            c0 = c0_all if single or c0_all is None else c0_all[first:last]
            hn = h_n if single else h_n[first:last]
            cn = c_n if single or c_n is None else c_n[first:last]
            _backend.forward_prepared(plan.prepared, xproj, out, h0, c0, hn, cn, biases)
            x = out
        return x, h_n, c_n


def _project(x: Tensor, w_ih: tuple, b_ih: tuple, block: Optional[Tensor]) -> list:
    """Per direction x W_ih^T (+ b_ih): [T, B, G*H] with unit stride in the last dimension; in
    `block` (ProjectionBuffer.lend) where one is lent (_input_projection.project_into)."""
    if block is None:
        return [_input_projection.project(x, w, b) for w, b in zip(w_ih, b_ih)]
    seq_len, batch, width = x.shape
    rows, gates_width = seq_len * batch, w_ih[0].size(0)
    x_rows = x.reshape(rows, width)
    xproj = []
    for direction, (w, b) in enumerate(zip(w_ih, b_ih)):
        dest = block[direction * rows * gates_width:(direction + 1) * rows * gates_width]
        _input_projection.project_into(x_rows, w, b, dest.view(rows, gates_width))
        xproj.append(dest.view(seq_len, batch, gates_width))
    return xproj


class _CachedPlan:
    """A plan (or one_step_weights' checked weights) with the parameter tensors (weakly: a cache
    keyed by one of them must not keep it alive) and the memory layout (pointer, shape, strides)
    of each when it was built."""

    def __init__(self, plan, params: tuple):
        self.plan = plan
        self.params = tuple(weakref.ref(p) for p in params)
        self.layout = _layout(params)
        self.storage = tuple(p.detach() for p in params)  # the checked pointers stay unique
        self.module = _backend.module_for(params[0].device)
        self.backend_setting = _backend.env_value(_backend.BACKEND_VARIABLE)

    def holds(self, params: tuple) -> bool:
        """Whether it was built from exactly these tensors, still in the same memory. (A
        parameter since freed leaves a dead reference, which reads None: none of `params` is
        None, so a weight set to None in its place, which _own_parameters leaves out, cannot
        match it; review, session 30.)"""
        return (len(params) == len(self.params)
                and all(ref() is p for ref, p in zip(self.params, params))
                and _layout(params) == self.layout)

    def matches(self, params: tuple) -> bool:
        """holds(params), for the native module that runs them now (FUSEDRNN_BACKEND may change
        between calls; the module is looked up again only when the variable did: ~1.5 of the
        ~4 us of this check)."""
        if not self.holds(params):
            return False
        return (_backend.env_value(_backend.BACKEND_VARIABLE) == self.backend_setting
                or _backend.module_for(params[0].device) is self.module)


def _layout(params: tuple) -> list:
    # (dtype too: `.data = w.view(torch.float16)` of a bfloat16 weight keeps memory, shape and
    # strides, and ran on the old plan: review, session 29)
    return [(p.data_ptr(), p.dtype, p.shape, p.stride()) for p in params]


_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_step_weights: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forget(module) -> None:
    """Drops what the caches hold for `module` (its plan and checked one-step weights, and the
    compiled op's plan keyed by its first weight): nothing then refers to its parameters."""
    _plans.pop(module, None)
    _step_weights.pop(module, None)
    from . import _compiled_inference  # (it imports this module)
    for p in module.parameters(recurse=False):
        _compiled_inference.forget_plan(p)
