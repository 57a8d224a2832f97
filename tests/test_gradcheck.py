"""torch.autograd.gradcheck in float64 through the native recurrence: every cell, proj_size,
bidirectional and multi-layer stacks, packed sequences (sorted and unsorted), the cells, and
non-contiguous inputs. Finite differences of the module against its own analytic gradients, with
respect to the input, the initial states and every parameter; and gradgradcheck of the double
backward (create_graph's recomputation)."""
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn

from _helpers import requires_native

pytestmark = requires_native

CASES = [
    # (id, class, kwargs, packing)
    ("lstm", fusedrnn.LSTM, {}, None),
    ("lstm-proj", fusedrnn.LSTM, dict(proj_size=2), None),
    ("lstm-proj-bidir-L2", fusedrnn.LSTM, dict(proj_size=2, bidirectional=True, num_layers=2), None),
    ("gru", fusedrnn.GRU, {}, None),
    ("gru-bidir-L2-nobias", fusedrnn.GRU, dict(bidirectional=True, num_layers=2, bias=False), None),
    ("rnn-tanh", fusedrnn.RNN, {}, None),
    ("rnn-relu-bidir", fusedrnn.RNN, dict(nonlinearity="relu", bidirectional=True), None),
    ("lstm-packed-sorted", fusedrnn.LSTM, dict(bidirectional=True), "sorted"),
    ("lstm-proj-packed-unsorted", fusedrnn.LSTM, dict(proj_size=2, bidirectional=True), "unsorted"),
    ("gru-packed-unsorted-L2", fusedrnn.GRU, dict(num_layers=2, bidirectional=True), "unsorted"),
    ("rnn-tanh-packed-sorted", fusedrnn.RNN, dict(bidirectional=True), "sorted"),
    # The LSTM variants (peephole connections, coupled input and forget gates).
    ("lstm-peephole", fusedrnn.LSTM, dict(peephole=True), None),
    ("lstm-cifg", fusedrnn.LSTM, dict(coupled_input_forget=True), None),
    ("lstm-peephole-cifg-proj-bidir-L2", fusedrnn.LSTM,
     dict(peephole=True, coupled_input_forget=True, proj_size=2, bidirectional=True,
          num_layers=2), None),
    ("lstm-peephole-packed-unsorted", fusedrnn.LSTM, dict(peephole=True, bidirectional=True),
     "unsorted"),
]


@pytest.mark.parametrize("name, cls, kwargs, packing", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_modules(name, cls, kwargs, packing):
    torch.manual_seed(0)
    module = cls(3, 4, dtype=torch.float64, **kwargs)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    seq_len, batch = 4, 3
    x = torch.randn(seq_len, batch, 3, dtype=torch.float64, requires_grad=True)
    num = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(num, batch, module.proj_size or module.hidden_size, dtype=torch.float64,
                     requires_grad=True)
    c0 = torch.randn(num, batch, module.hidden_size, dtype=torch.float64, requires_grad=True)
    is_lstm = cls is fusedrnn.LSTM
    lengths = torch.tensor([4, 2, 3]) if packing == "unsorted" else torch.tensor([4, 3, 1])

    def run(x, h0, c0, *params):
        inp = x
        if packing is not None:
            inp = pack_padded_sequence(x, lengths, enforce_sorted=packing == "sorted")
        hx = (h0, c0) if is_lstm else h0
        out, state = functional_call(module, dict(zip(names, params)), (inp, hx))
        if isinstance(out, PackedSequence):
            out = out.data
        return (out, *state) if is_lstm else (out, state)

    inputs = (x, h0, c0, *params)
    # Stacks and bidirectional layers have hundreds of inputs: fast mode checks random
    # projections of the Jacobian instead of every column (one-direction layers check every
    # column; test_modules compares all these gradients with torch.nn's at 1e-9 besides).
    fast = module.num_layers > 1 or module.bidirectional
    assert torch.autograd.gradcheck(run, inputs, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("name, kwargs", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}),
                                          ("RNNCell", dict(nonlinearity="relu")),
                                          ("LSTMCell", dict(bias=False))],
                         ids=["lstm", "gru", "rnn-tanh", "rnn-relu", "lstm-nobias"])
def test_gradcheck_cells(name, kwargs):
    run, inputs = _cell_problem(name, **kwargs)
    assert torch.autograd.gradcheck(run, inputs, atol=1e-6, rtol=1e-5)


def _cell_problem(name, **kwargs):
    """A float64 cell as a function of (x, h, c, *params), and random values for those."""
    torch.manual_seed(0)
    cell = getattr(fusedrnn, name)(3, 5, dtype=torch.float64, **kwargs)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def run(x, h, c, *params):
        hx = (h, c) if name == "LSTMCell" else h
        return functional_call(cell, dict(zip(names, params)), (x, hx))

    return run, (x, h, c, *params)


def test_gradcheck_non_contiguous_batch_first():
    """batch_first input that is a strided view, and a state that is a transposed view."""
    torch.manual_seed(0)
    module = fusedrnn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                          dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    base = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    h_base = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)

    def run(base, h_base, *params):
        x = base[:, :, ::2]           # [B, T, I] with a stride-2 feature dimension
        h0 = h_base.transpose(0, 1)   # [L*D, B, P] non-contiguous
        out, h_n = functional_call(module, dict(zip(names, params)), (x, h0))
        return out, h_n

    assert torch.autograd.gradcheck(run, (base, h_base, *params), atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


GRADGRAD_CASES = [
    ("lstm-proj-bidir-packed", fusedrnn.LSTM, dict(proj_size=2, bidirectional=True), True),
    ("gru-L2", fusedrnn.GRU, dict(num_layers=2), False),
    ("rnn-relu-bidir", fusedrnn.RNN, dict(nonlinearity="relu", bidirectional=True), False),
    ("lstm-peephole-cifg-bidir-packed", fusedrnn.LSTM,
     dict(peephole=True, coupled_input_forget=True, bidirectional=True), True),
]


@pytest.mark.parametrize("name, cls, kwargs, packed", GRADGRAD_CASES,
                         ids=[c[0] for c in GRADGRAD_CASES])
def test_gradgradcheck_modules(name, cls, kwargs, packed):
    """Double backward (create_graph recomputes the layers as reference ops): second
    derivatives against finite differences of the first, wrt the input, the state and every
    parameter."""
    torch.manual_seed(0)
    module = cls(3, 4, dtype=torch.float64, **kwargs)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    num = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(num, 2, module.proj_size or module.hidden_size, dtype=torch.float64,
                     requires_grad=True)

    def run(x, h0, *params):
        inp = pack_padded_sequence(x, torch.tensor([2, 3]), enforce_sorted=False) if packed else x
        hx = (h0, torch.zeros(num, 2, module.hidden_size, dtype=torch.float64)) \
            if cls is fusedrnn.LSTM else h0
        out, _ = functional_call(module, dict(zip(names, params)), (inp, hx))
        return out.data if isinstance(out, PackedSequence) else out

    assert torch.autograd.gradgradcheck(run, (x, h0, *params), atol=1e-6, rtol=1e-5,
                                        fast_mode=True)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_gradgradcheck_cells(name):
    run, inputs = _cell_problem(name)
    assert torch.autograd.gradgradcheck(run, inputs, atol=1e-6, rtol=1e-5)
