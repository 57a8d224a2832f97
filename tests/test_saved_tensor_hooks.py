"""torch.autograd.graph.saved_tensors_hooks (what save_on_cpu, activation offloading and
compression are built on) around fusedrnn's modules and cells: whatever the unpack hook returns
with the saved values (here: the same values with other strides), the gradients are those of the
run without hooks, as torch.nn's are.

Before, the cell step's backward handed the kernel its saved gates as they came back (a cell, or a
module called with one time step, got wrong gradients silently: relative error up to 1.6) and the
layer's raised "fusedrnn internal error: c_seq must be contiguous".
"""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import fusedrnn

from _helpers import rel_err, requires_native, use_backend

pytestmark = requires_native


def _transposed_storage(t):
    """Packs a matrix-like tensor as its transpose, made dense (another memory layout)."""
    if t.dim() >= 2 and t.size(0) > 1 and t.size(1) > 1:
        return True, t.transpose(0, 1).contiguous()
    return False, t


def _same_values_other_strides(packed):
    transposed, t = packed
    return t.transpose(0, 1) if transposed else t


CASES = [
    # (id, class name, kwargs, input shape: [B, I] for a cell, [T, B, I] for a module)
    ("lstm-cell", "LSTMCell", {}, (3, 4)),
    ("gru-cell", "GRUCell", {}, (3, 4)),
    ("rnn-cell", "RNNCell", {}, (3, 4)),
    ("lstm-one-step", "LSTM", {}, (1, 3, 4)),
    ("gru-one-step", "GRU", {}, (1, 3, 4)),
    ("lstm-L2-bidir", "LSTM", dict(num_layers=2, bidirectional=True), (4, 3, 4)),
    ("lstm-proj", "LSTM", dict(proj_size=3), (4, 3, 4)),
    ("lstm-peephole", "LSTM", dict(peephole=True), (4, 3, 4)),
    ("gru-bidir", "GRU", dict(bidirectional=True), (4, 3, 4)),
    ("rnn-relu-L2", "RNN", dict(num_layers=2, nonlinearity="relu"), (4, 3, 4)),
]


def _gradients(module, x, hooked: bool):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    if hooked:
        with saved_tensors_hooks(_transposed_storage, _same_values_other_strides):
            result = module(x)
    else:
        result = module(x)
    leaves = [t for t in (result if isinstance(result, tuple) else (result,))]
    leaves = [u for t in leaves for u in (t if isinstance(t, tuple) else (t,))]
    torch.manual_seed(1)
    sum(t.mul(torch.randn_like(t)).sum() for t in leaves).backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend_name", ["cpu", "emu"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradients_do_not_depend_on_how_saved_tensors_come_back(case, backend_name,
                                                                monkeypatch):
    use_backend(backend_name, monkeypatch)
    _, name, kwargs, shape = case
    torch.manual_seed(0)
    module = getattr(fusedrnn, name)(4, 5, **kwargs).double()
    x = torch.randn(*shape, dtype=torch.float64)
    expected = _gradients(module, x, hooked=False)
    got = _gradients(module, x, hooked=True)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-12
