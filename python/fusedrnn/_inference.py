"""The modules' no-grad fast path: a per-module plan of everything an inference call does not
need to redo, rebuilt as soon as a weight changes.

At B=1 the recurrence of a small LSTM takes tens of microseconds, so what surrounds it counts:
folding b_ih into b_hh, concatenating the two directions' W_ih, making weights contiguous and
building the native params structs cost more than the kernel (B=1 H=64: ~27 of ~37 us of fixed
cost per call). A plan does that once: per layer the input-projection weight (and GRU's b_ih), and
the native templates (_backend.prepare_forward) that point at the folded bias and W_hh.

A plan is valid while the module's parameters are the same tensor objects, at the same versions
and data pointers: in-place updates (optimizer steps, load_state_dict, `w.mul_(2)` under no_grad)
bump a tensor's version, `.data =` moves its pointer, and .to()/functional_call/assignments swap
the objects. The plan holds references to the tensors it was built from, so no new tensor can take
over an identity it checks. Plans live in a weak table beside the modules, never in them: a
deepcopy or pickle of a module must not carry raw pointers into the original's weights. Calls only
read a plan; concurrent calls from several threads are safe (each allocates its own outputs and
workspace). Modules whose weights are not plain registered parameters (torch.nn.utils
parametrizations, inference-mode tensors without a version counter) take the ordinary path.
"""
from __future__ import annotations

import weakref
from operator import is_
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from ._backend import GATE_COUNT


class _LayerPlan(NamedTuple):
    w_ih: Tensor                    # [D*G*H, I]: the directions' W_ih, one GEMM for all
    b_ih: Optional[Tensor]          # [D*G*H] GRU's b_ih (LSTM/RNN fold it into b_hh), or None
    prepared: _backend.PreparedForward


# Not under torch.compiler.disable (its wrapper costs ~2 us a call): the modules never come here
# while compiling (RNNBase._fast_forward), so torch.compile sees functional.rnn's clean break.
def forward(module, cell: str, num_layers: int, num_directions: int, x: Tensor,
            h0_all: Optional[Tensor], c0_all: Optional[Tensor]):
    """The module's inference forward through its plan (InferencePlan.run: arguments and results);
    None where no plan applies."""
    plan = plan_for(module, cell, num_layers, num_directions)
    return plan.run(x, h0_all, c0_all) if plan is not None else None


def plan_for(module, cell: str, num_layers: int, num_directions: int):
    """A plan for the module's current weights: its cached one while valid, else a new one
    (cached where the weights allow it); None where the weights do not share one dtype and device
    (the ordinary path then reports it)."""
    params = tuple(module._parameters.values())
    cached = _plans.get(module)
    if cached is not None and cached.matches(params):
        return cached.plan
    layer_weights = module._layer_weights()
    used = [t for w in layer_weights for t in w if t is not None]
    dtype, device = used[0].dtype, used[0].device
    if any(t.dtype is not dtype or t.device != device for t in used):
        return None
    plan = InferencePlan(cell, layer_weights, num_layers, num_directions)
    if (len(used) == len(params) and {id(t) for t in used} == {id(p) for p in params}
            and not any(p.is_inference() for p in params)):
        _plans[module] = _CachedPlan(plan, params)
    return plan


class InferencePlan:
    """The prepared layers of one module's weights: what each inference call would redo."""

    def __init__(self, cell: str, layer_weights: list, num_layers: int, num_directions: int):
        self.num_directions = num_directions
        w_hh0 = layer_weights[0][1]
        self.state = w_hh0.size(1)
        self.hidden = w_hh0.size(0) // GATE_COUNT[cell]
        self.is_lstm = cell == "lstm"
        fold_bias = cell != "gru"
        layers = []
        for layer in range(num_layers):
            lw = layer_weights[layer * num_directions:(layer + 1) * num_directions]
            has_bias = lw[0][2] is not None
            w_ih = torch.cat([w[0] for w in lw]) if num_directions > 1 else lw[0][0]
            b_ih = None
            if has_bias and not fold_bias:
                b_ih = torch.cat([w[2] for w in lw]) if num_directions > 1 else lw[0][2]
            if has_bias:
                b_hh = [(w[2] + w[3]) if fold_bias else w[3].contiguous() for w in lw]
            else:
                b_hh = [None] * num_directions
            w_hh = [w[1].contiguous() for w in lw]
            w_hr = [w[4].contiguous() if w[4] is not None else None for w in lw]
            layers.append(_LayerPlan(w_ih, b_ih, _backend.prepare_forward(cell, w_hh, b_hh, w_hr)))
        self.layers = layers

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
        single = len(self.layers) == 1
        for layer, plan in enumerate(self.layers):
            first, last = layer * num_dirs, (layer + 1) * num_dirs
            xproj = F.linear(x, plan.w_ih, plan.b_ih)
            if xproj.stride(2) != 1:
                xproj = xproj.contiguous()
            out = x.new_empty(seq_len, batch, num_dirs * state)
            h0 = h0_all if single or h0_all is None else h0_all[first:last]
            c0 = c0_all if single or c0_all is None else c0_all[first:last]
            hn = h_n if single else h_n[first:last]
            cn = c_n if single or c_n is None else c_n[first:last]
            _backend.forward_prepared(plan.prepared, xproj, out, h0, c0, hn, cn)
            x = out
        return x, h_n, c_n


class _CachedPlan:
    """A plan with the parameter tensors, versions and data pointers it was built from."""

    def __init__(self, plan: InferencePlan, params: tuple):
        self.plan = plan
        self.params = params
        self.versions = tuple(p._version for p in params)
        self.pointers = tuple(p.data_ptr() for p in params)
        self.module = _backend.module_for(params[0].device)

    def matches(self, params: tuple) -> bool:
        """Whether the plan was built from exactly these tensors, unchanged since, for the native
        module that runs them now (FUSEDRNN_BACKEND may change between calls)."""
        return (len(params) == len(self.params) and all(map(is_, params, self.params))
                and tuple(p._version for p in params) == self.versions
                and tuple(p.data_ptr() for p in params) == self.pointers
                and _backend.module_for(params[0].device) is self.module)


_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
