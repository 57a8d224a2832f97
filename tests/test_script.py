"""torch.jit.script of the modules and cells (fusedrnn/_script.py).

torch.nn's RNNs script (as submodules: their forward is overloaded for tensors and packed
sequences, so only a caller's types pick one) and so do its cells (directly). fusedrnn's script
the same way, and the script runs each layer's recurrence as the custom op
fusedrnn::layer_forward: the native kernels, forward and backward. Each test compares a scripted
fusedrnn module with torch.nn in float64, results and every gradient.
"""
import io
from typing import Optional

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import fusedrnn
from fusedrnn import _layer_recurrence

from _helpers import assert_close, ramp_loss, requires_native

pytestmark = [requires_native,
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

DTYPE = torch.float64
TOLERANCE = 1e-10


class _Lstm(torch.nn.Module):
    """A scripted caller of an LSTM with a tensor input and optional states."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor]):
        if h0 is not None and c0 is not None:
            out, (h, c) = self.rnn(x, (h0, c0))
        else:
            out, (h, c) = self.rnn(x)
        return [out, h, c]


class _Single(torch.nn.Module):
    """A scripted caller of a GRU/RNN with a tensor input and an optional state."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h0: Optional[Tensor]):
        out, h = self.rnn(x, h0)
        return [out, h]


class _Packed(torch.nn.Module):
    """A scripted caller with a PackedSequence input (no state)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: PackedSequence):
        out, state = self.rnn(x)
        if isinstance(state, Tensor):
            return [out.data, state]
        return [out.data, state[0], state[1]]


class _PackedLstm(torch.nn.Module):
    """A scripted caller of an LSTM with a PackedSequence input and states (in the caller's
    batch order, which the module sorts like the packed data and unsorts in h_n, c_n)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: PackedSequence, h0: Tensor, c0: Tensor):
        out, (h, c) = self.rnn(x, (h0, c0))
        return [out.data, h, c]


class _PackedSingle(torch.nn.Module):
    """A scripted caller of a GRU/RNN with a PackedSequence input and a state."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: PackedSequence, h0: Tensor):
        out, h = self.rnn(x, h0)
        return [out.data, h]


MODULES = [
    # (id, class name, kwargs)
    ("lstm-proj-bidir-L2", "LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("lstm-batch_first", "LSTM", dict(batch_first=True)),
    ("gru-bidir", "GRU", dict(bidirectional=True)),
    ("rnn-relu-nobias-L2", "RNN", dict(nonlinearity="relu", bias=False, num_layers=2)),
]


def _pair(name, kwargs, dtype=DTYPE):
    """A torch.nn module and a fusedrnn one with the same weights."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, name)(3, 4, dtype=dtype, **kwargs)
    ours = getattr(fusedrnn, name)(3, 4, dtype=dtype, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _run(module, args):
    """(results, gradients of the inputs and parameters) of module(*args) under ramp_loss."""
    leaves = [a for a in args if isinstance(a, Tensor)] + list(module.parameters())
    for leaf in leaves:
        leaf.grad = None
    results = module(*args)
    results = [r for r in results]
    grads = torch.autograd.grad(ramp_loss(results), leaves, allow_unused=True)
    return results, grads


def _compare(expected_run, actual_run, what):
    for kind, expected, actual in zip(("result", "gradient"), expected_run, actual_run):
        assert len(actual) == len(expected)
        for index, (e, a) in enumerate(zip(expected, actual)):
            if e is None:
                assert a is None or not a.any(), f"{what}: {kind} {index}"
                continue
            assert_close(a, e, TOLERANCE, f"{what}: {kind} {index}")


def _states(module, batch, with_state):
    if not with_state:
        return None, None
    count = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(count, batch, module.proj_size or module.hidden_size, dtype=DTYPE,
                     requires_grad=True)
    if module.mode != "LSTM":
        return h0, None
    return h0, torch.randn(count, batch, module.hidden_size, dtype=DTYPE, requires_grad=True)


def _count_native_forwards(monkeypatch):
    """A list that grows by one per native layer forward (_layer_recurrence._run_forward, which
    the custom op's kernel calls)."""
    calls = []
    original = _layer_recurrence._run_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_layer_recurrence, "_run_forward", counting)
    return calls


@pytest.mark.parametrize("case", MODULES, ids=[c[0] for c in MODULES])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_scripted_module_matches_torch(case, with_state, monkeypatch):
    _, name, kwargs = case
    reference, ours = _pair(name, kwargs)
    shape = (2, 5, 3) if ours.batch_first else (5, 2, 3)
    x = torch.randn(*shape, dtype=DTYPE, requires_grad=True)
    h0, c0 = _states(ours, 2, with_state)
    make, args = (_Lstm, (x, h0, c0)) if name == "LSTM" else (_Single, (x, h0))
    scripted = torch.jit.script(make(ours))
    calls = _count_native_forwards(monkeypatch)
    actual = _run(scripted, args)
    assert len(calls) == ours.num_layers, "the script runs each layer as the native op"
    _compare(_run(make(reference), args), actual, f"{name} {kwargs}")


@pytest.mark.parametrize("case", MODULES, ids=[c[0] for c in MODULES])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("in_order", [False, True], ids=["unsorted", "sorted"])
def test_scripted_module_packed_matches_torch(case, with_state, in_order):
    """Unsorted sequences (sorted_indices and unsorted_indices reorder the states) and sorted
    ones (pack_sequence(enforce_sorted=True): no indices)."""
    _, name, kwargs = case
    reference, ours = _pair(name, kwargs)
    torch.manual_seed(1)
    lengths = (5, 4, 3, 1) if in_order else (3, 5, 1, 4)
    sequences = [torch.randn(n, 3, dtype=DTYPE, requires_grad=True) for n in lengths]
    h0, c0 = _states(ours, len(sequences), with_state)
    if not with_state:
        make, states = _Packed, ()
    elif name == "LSTM":
        make, states = _PackedLstm, (h0, c0)
    else:
        make, states = _PackedSingle, (h0,)
    scripted = torch.jit.script(make(ours))

    def run(module):
        results = module(pack_sequence(sequences, enforce_sorted=in_order), *states)
        leaves = sequences + list(states) + list(module.parameters())
        return results, torch.autograd.grad(ramp_loss(results), leaves, allow_unused=True)

    _compare(run(make(reference)), run(scripted), f"packed {name} {kwargs}")


def test_scripted_unbatched_input_matches_torch():
    reference, ours = _pair("LSTM", dict(num_layers=2, batch_first=True))
    x = torch.randn(5, 3, dtype=DTYPE, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=DTYPE, requires_grad=True)
    c0 = torch.randn(2, 4, dtype=DTYPE, requires_grad=True)
    scripted = torch.jit.script(_Lstm(ours))
    results, _ = actual = _run(scripted, (x, h0, c0))
    assert [tuple(r.shape) for r in results] == [(5, 4), (2, 4), (2, 4)]
    _compare(_run(_Lstm(reference), (x, h0, c0)), actual, "unbatched LSTM")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_scripted_dropout_draws_the_eager_mask(packed):
    """In training, dropout between layers draws what the eager module draws from the same
    seed (eager fusedrnn draws torch.nn's mask, also on packed data)."""
    _, ours = _pair("GRU", dict(num_layers=3, dropout=0.5))
    ours.train()
    torch.manual_seed(2)
    sequences = [torch.randn(n, 3, dtype=DTYPE) for n in (4, 2, 3)]
    if packed:
        x = pack_sequence(sequences, enforce_sorted=False)
        caller = _Packed
    else:
        x = torch.stack([s[:2] for s in sequences], 1)
        caller = _Single
    args = (x,) if packed else (x, torch.zeros(3, 3, 4, dtype=DTYPE))
    scripted = torch.jit.script(caller(ours))
    torch.manual_seed(3)
    eager = caller(ours)(*args)
    torch.manual_seed(3)
    script = scripted(*args)
    for e, a in zip(eager, script):
        assert_close(a, e, TOLERANCE, "dropout output")


CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", dict(nonlinearity="relu")),
         ("RNNCell", dict(bias=False))]


@pytest.mark.parametrize("case", CELLS, ids=["lstm", "gru", "rnn-relu", "rnn-nobias"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_scripted_cell_matches_torch(case, batched):
    name, kwargs = case
    torch.manual_seed(0)
    reference = getattr(torch.nn, name)(3, 4, dtype=DTYPE, **kwargs)
    ours = getattr(fusedrnn, name)(3, 4, dtype=DTYPE, **kwargs)
    ours.load_state_dict(reference.state_dict())
    scripted = torch.jit.script(ours)
    shape = (2,) if batched else ()
    x = torch.randn(*shape, 3, dtype=DTYPE, requires_grad=True)
    h = torch.randn(*shape, 4, dtype=DTYPE, requires_grad=True)
    c = torch.randn(*shape, 4, dtype=DTYPE, requires_grad=True)
    state = (h, c) if name == "LSTMCell" else h

    def run(module):
        results = module(x, state)
        results = list(results) if isinstance(results, tuple) else [results]
        leaves = [x, h] + ([c] if name == "LSTMCell" else []) + list(module.parameters())
        return results, torch.autograd.grad(ramp_loss(results), leaves, allow_unused=True)

    _compare(run(reference), run(scripted), f"{name} {kwargs}")
    # and without a state
    assert_close(scripted(x)[0] if name == "LSTMCell" else scripted(x),
                 reference(x)[0] if name == "LSTMCell" else reference(x), TOLERANCE, "no state")


@requires_native
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("weight", ["bias_ih", "bias_hh"])
def test_scripted_cell_with_one_bias_set_to_none_matches_torch(name, weight):
    """torch.nn's cell ops take each bias as optional, scripted too; the scripted cell dropped
    the remaining bias with the missing one (review, session 31)."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, name)(3, 4, dtype=DTYPE)
    ours = getattr(fusedrnn, name)(3, 4, dtype=DTYPE)
    ours.load_state_dict(reference.state_dict())
    for module in (reference, ours):
        setattr(module, weight, None)
    x = torch.randn(2, 3, dtype=DTYPE)
    first = (lambda r: r[0] if isinstance(r, tuple) else r)
    assert_close(first(torch.jit.script(ours)(x)), first(reference(x)), TOLERANCE,
                 f"scripted {name} without {weight}")


@pytest.mark.parametrize("name", ["LSTM", "GRU", "GRUCell"])
def test_scripted_module_runs_under_cpu_autocast(name):
    """Under CPU autocast TorchScript runs the input projection's GEMM in bfloat16; the script
    runs the layer in the input's dtype, and so takes it back (the layer op refused the bfloat16
    projection next to float32 weights). torch.nn's scripted modules run there too (its GRU
    returns float32, its LSTM and GRUCell bfloat16). Found by review in session 29."""
    torch.manual_seed(0)
    module = getattr(fusedrnn, name)(3, 4)
    scripted = torch.jit.script(_Single(module) if name == "GRU" else
                                _Lstm(module) if name == "LSTM" else module)
    x = torch.randn(2, 3) if name == "GRUCell" else torch.randn(5, 2, 3)
    args = (x,) if name == "GRUCell" else (x, None) if name == "GRU" else (x, None, None)
    expected = scripted(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scripted(*args)
    for e, a in zip(*((r,) if isinstance(r, Tensor) else r for r in (expected, got))):
        assert a.dtype == torch.float32
        assert_close(a, e, 2e-2, "under autocast (a bfloat16 projection)")
    ramp_loss(list(got) if not isinstance(got, Tensor) else [got]).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_saved_script_loads_and_runs():
    reference, ours = _pair("LSTM", dict(num_layers=2, proj_size=2))
    scripted = torch.jit.script(_Lstm(ours))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(4, 3, 3, dtype=DTYPE)
    for e, a in zip(_Lstm(reference)(x, None, None), loaded(x, None, None)):
        assert_close(a, e, TOLERANCE, "loaded script")


def test_script_sees_parameter_updates_and_dtype_changes():
    """The script holds the parameters themselves: an optimizer step, load_state_dict and .to()
    on the scripted module are all seen."""
    reference, ours = _pair("GRU", dict(num_layers=2))
    scripted = torch.jit.script(_Single(ours))
    with torch.no_grad():
        for p_ref, p_script in zip(reference.parameters(), scripted.parameters()):
            p_ref.mul_(1.5)
            p_script.mul_(1.5)
    x, h0 = torch.randn(4, 2, 3, dtype=DTYPE), torch.zeros(2, 2, 4, dtype=DTYPE)
    for e, a in zip(_Single(reference)(x, h0), scripted(x, h0)):
        assert_close(a, e, TOLERANCE, "after an in-place update")
    torch.manual_seed(7)
    fresh = torch.nn.GRU(3, 4, num_layers=2, dtype=DTYPE)
    reference.load_state_dict(fresh.state_dict())
    scripted.rnn.load_state_dict(fresh.state_dict())
    for e, a in zip(_Single(reference)(x, h0), scripted(x, h0)):
        assert_close(a, e, TOLERANCE, "after load_state_dict")
    scripted.float()
    reference.float()
    for e, a in zip(_Single(reference)(x.float(), h0.float()),
                    scripted(x.float(), h0.float())):
        assert a.dtype == torch.float32
        assert_close(a, e, 2e-5, "after .float()")


def test_scripting_leaves_the_eager_module_alone():
    _, ours = _pair("LSTM", {})
    parent = _Lstm(ours)
    torch.jit.script(parent)
    assert type(parent.rnn) is fusedrnn.LSTM
    x = torch.randn(4, 2, 3, dtype=DTYPE)
    out, _ = parent.rnn(x)
    assert out.shape == (4, 2, 4)


def test_scripted_half_precision_on_cpu():
    _, ours = _pair("LSTM", dict(num_layers=2), dtype=torch.float32)
    scripted = torch.jit.script(_Lstm(ours))
    x = torch.randn(5, 2, 3)
    expected = ours(x)[0]
    ours.bfloat16()
    got = scripted(x.bfloat16(), None, None)[0]
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, 2e-2, "bfloat16 output")


@pytest.mark.parametrize("bad, message", [
    ("input_size", "input.size(-1) must be equal to input_size"),
    ("rank", "Expected input to be 2D or 3D"),
    ("state", "Expected hidden[0] size (2, 2, 4), got [2, 3, 4]"),
    ("dtype", "dtype"),
], ids=["input_size", "rank", "state", "dtype"])
def test_scripted_bad_input_raises_naming_it(bad, message):
    _, ours = _pair("LSTM", dict(num_layers=2))
    scripted = torch.jit.script(_Lstm(ours))
    x = torch.randn(5, 2, 3, dtype=DTYPE)
    h0 = c0 = None
    if bad == "input_size":
        x = torch.randn(5, 2, 7, dtype=DTYPE)
    elif bad == "rank":
        x = torch.randn(5, 2, 3, 1, dtype=DTYPE)
    elif bad == "state":
        h0, c0 = torch.zeros(2, 3, 4, dtype=DTYPE), torch.zeros(2, 2, 4, dtype=DTYPE)
    else:
        x = x.float()
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        scripted(x, h0, c0)


def test_frozen_script_matches_torch():
    """torch.jit.freeze (and optimize_for_inference, which freezes first) folds the parameters
    into the graph as constants; the op takes them as any other tensor."""
    reference, ours = _pair("LSTM", dict(num_layers=2, bidirectional=True))
    frozen = torch.jit.freeze(torch.jit.script(_Lstm(ours)).eval())
    x = torch.randn(5, 2, 3, dtype=DTYPE)
    with torch.no_grad():
        for e, a in zip(_Lstm(reference)(x, None, None), frozen(x, None, None)):
            assert_close(a, e, TOLERANCE, "frozen script")


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_scripted_empty_batch_matches_torch(name):
    """B = 0, which torch.nn accepts: empty results of the right shapes, still connected to the
    weights."""
    reference, ours = _pair(name, dict(num_layers=2, bidirectional=True))
    make = _Lstm if name == "LSTM" else _Single
    x = torch.randn(5, 0, 3, dtype=DTYPE)
    args = (x, None, None) if name == "LSTM" else (x, None)
    expected, actual = make(reference)(*args), torch.jit.script(make(ours))(*args)
    assert [tuple(t.shape) for t in actual] == [tuple(t.shape) for t in expected]
    assert all(t.requires_grad for t in actual)
