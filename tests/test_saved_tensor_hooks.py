"""torch.autograd.graph.saved_tensors_hooks (what save_on_cpu, activation offloading and
compression are built on) around fusedrnn's modules and cells: whatever the unpack hook returns
with the saved values (here: the same values with other strides), the gradients are those of the
run without hooks, as torch.nn's are.

Before, the cell step's backward handed the kernel its saved gates as they came back (a cell, or a
module called with one time step, got wrong gradients silently: relative error up to 1.6) and the
layer's raised "fusedrnn internal error: c_seq must be contiguous".
"""
import gc
import weakref
from contextlib import nullcontext

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


# Cases whose input and initial states are intermediate tensors (as an embedding's output is):
# a leaf that requires grad is kept alive by its gradient accumulator whatever saves it.
HELD_CASES = [
    ("lstm-L2-bidir", "LSTM", dict(num_layers=2, bidirectional=True), (4, 3, 4)),
    ("gru-batch-first", "GRU", dict(batch_first=True), (3, 4, 4)),
    ("lstm-proj", "LSTM", dict(proj_size=3), (3, 3, 4)),
    ("lstm-peephole", "LSTM", dict(peephole=True), (3, 3, 4)),
    ("gru-one-step", "GRU", {}, (1, 3, 4)),
    ("rnn-tanh", "RNN", {}, (3, 3, 4)),
    ("lstm-cell", "LSTMCell", {}, (3, 4)),
    ("gru-cell", "GRUCell", {}, (3, 4)),
    ("rnn-cell", "RNNCell", {}, (3, 4)),
]


def _run_holding_only_weak_refs(module, shape, h_shape, c_shape, hooked: bool):
    """The module on an intermediate x and initial state, under a pack hook that stores a copy
    (save_on_cpu's way) when hooked; returns the result, weak references to x, h0 and c0, and
    the leaves they were computed from."""
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
              for s in (shape, h_shape, c_shape)]
    hooks = saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hooked else nullcontext()
    with hooks:
        x, h0, c0 = (leaf * 1.5 for leaf in leaves)
        result = module(x, (h0, c0) if isinstance(module, (fusedrnn.LSTM, fusedrnn.LSTMCell))
                        else h0)
    return result, [weakref.ref(t) for t in (x, h0, c0)], leaves


@pytest.mark.parametrize("backend_name", ["cpu", "emu"])
@pytest.mark.parametrize("case", HELD_CASES, ids=[c[0] for c in HELD_CASES])
def test_hooks_see_everything_the_backward_keeps(case, backend_name, monkeypatch):
    """Under a pack hook that stores copies (save_on_cpu, activation offloading), nothing of the
    forward's input or initial state outlives the forward, as with torch.nn; the gradients, and
    create_graph's second-order ones (a gradient penalty), are those of the run without hooks.
    Before, the backward kept the input, h0 and c0 by reference for create_graph's recomputation,
    so save_on_cpu left them on the device."""
    use_backend(backend_name, monkeypatch)
    _, name, kwargs, shape = case
    torch.manual_seed(0)
    module = getattr(fusedrnn, name)(4, 5, **kwargs).double()
    layers = (2 if kwargs.get("bidirectional") else 1) * kwargs.get("num_layers", 1)
    batch = shape[0] if len(shape) == 2 or kwargs.get("batch_first") else shape[1]
    h_size = kwargs.get("proj_size", 5)
    h_shape, c_shape = (((batch, h_size), (batch, 5)) if len(shape) == 2
                        else ((layers, batch, h_size), (layers, batch, 5)))
    results = []
    for hooked in (False, True):
        torch.manual_seed(1)
        result, refs, leaves = _run_holding_only_weak_refs(module, shape, h_shape, c_shape,
                                                           hooked)
        gc.collect()
        if hooked:
            alive = [n for n, r in zip(("x", "h0", "c0"), refs) if r() is not None]
            assert not alive, f"kept past the forward under the hook: {alive}"
        outputs = [t for t in (result if isinstance(result, tuple) else (result,))]
        outputs = [u for t in outputs for u in (t if isinstance(t, tuple) else (t,))]
        loss = sum(t.pow(2).sum() for t in outputs)
        inputs = [*module.parameters(), *leaves]
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        penalty = sum(g.pow(2).sum() for g in grads if g is not None)
        used = [t for t, g in zip(inputs, grads) if g is not None]
        results.append([g for g in grads if g is not None]
                       + list(torch.autograd.grad(penalty, used)))
    assert len(results[1]) == len(results[0])
    for got, expected in zip(results[1], results[0]):
        assert rel_err(got, expected) <= 1e-12


def test_hooks_see_the_input_projections_copy_of_a_strided_input(monkeypatch):
    """On oneDNN (AMD CPUs with AVX-512 choose it, FUSEDRNN_CPU_GEMM=onednn forces it) the input
    projection flattens a batch_first input to a dense [T*B, I] copy and keeps it for dW: it
    went through ctx, unseen by the pack hook (save_on_cpu left it on the device); it is saved
    now. The gradients are those of the run without hooks."""
    from fusedrnn import _input_projection
    if not _input_projection.onednn_available():
        pytest.skip("torch has no oneDNN linear here")
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "onednn")
    torch.manual_seed(0)
    module = fusedrnn.GRU(4, 5, batch_first=True)
    x = torch.randn(3, 6, 4, requires_grad=True)
    expected = torch.autograd.grad(module(x)[0].square().sum(), [x, *module.parameters()])
    packed_shapes = []

    def pack(t):
        packed_shapes.append(tuple(t.shape))
        return t.clone()

    with saved_tensors_hooks(pack, lambda t: t):
        out = module(x)[0]
    assert (18, 4) in packed_shapes  # [T*B, I]
    got = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-6


@pytest.mark.parametrize("name", ["LSTM", "GRUCell"])
def test_what_the_hook_packed_is_freed_by_the_backward(name):
    """A first-order backward (no retain_graph) frees what the forward saved, the hook's copies
    with it, while the graph's outputs are still referenced (a training loop's `loss` until the
    next forward), as with torch.nn. The copies kept for create_graph lived on to the graph's end
    (found by review)."""
    torch.manual_seed(0)
    module = getattr(fusedrnn, name)(4, 5, **({} if name.endswith("Cell") else
                                              dict(num_layers=2, bidirectional=True)))
    x = torch.randn(*((3, 4) if name.endswith("Cell") else (6, 3, 4)), requires_grad=True)
    copies = []

    def pack(t):
        copy = t.clone()
        copies.append(weakref.ref(copy))
        return copy

    with saved_tensors_hooks(pack, lambda t: t):
        result = module(x * 2)
    out = result[0] if isinstance(result, tuple) else result
    loss = out.square().sum()
    loss.backward()
    gc.collect()
    alive = [r() for r in copies if r() is not None]
    assert not alive, f"{len(alive)} packed copies outlived the backward: " \
                      f"{[tuple(t.shape) for t in alive]}"
    del loss, out, result


def _other_dtype(t):
    return t.double() if t.is_floating_point() else t


def _cut_last_dim(t):
    return t[..., :1] if t.dim() >= 2 and t.size(-1) > 1 else t


@pytest.mark.parametrize("backend_name", ["cpu", "emu"])
@pytest.mark.parametrize("unpack", [_other_dtype, _cut_last_dim], ids=["dtype", "shape"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "lstm-cell", "gru-one-step", "lstm-L2-bidir", "lstm-proj")], ids=lambda c: c[0])
def test_an_unpack_hook_that_changes_a_tensor_is_refused(case, unpack, backend_name,
                                                         monkeypatch):
    """The native backwards read saved tensors as the forward's memory: an unpack hook returning
    another dtype (a compression hook that does not cast back) or shape gave wrong gradients
    (0.2 off, inf) where torch.nn's ops raise (review, session 29). Now a clear error."""
    use_backend(backend_name, monkeypatch)
    _, name, kwargs, shape = case
    torch.manual_seed(0)
    module = getattr(fusedrnn, name)(4, 5, **kwargs)
    x = torch.randn(*shape, requires_grad=True)
    with saved_tensors_hooks(lambda t: t, unpack):
        result = module(x)
    first = result[0] if isinstance(result, tuple) else result
    with pytest.raises(RuntimeError, match="came back from a saved_tensors_hooks unpack hook as"):
        first.sum().backward()
